"""What an edit between two prompts takes out of the object (``edits_out_of_object``, used by the Interactive
section's ``_take_out_edits`` on the GUI thread before each prompt) is found on the edits' bounding boxes, fast,
and is exactly what the former per-voxel ``np.unique`` found.

The former code sorted every edited voxel's flat index: 0.9 s on the GUI thread for a 1 M-voxel bucket fill in a
512x512x300 CT, between two clicks. The timing test fills the liver of the real abdomen CT (its TotalSegmentator
labels, resampled from 3 mm to 1 mm by repetition: a CT-sized object) with napari's own bucket fill.
No display needed: ``python -m pytest tests/test_napari_take_out_edits.py``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
napari_labels = pytest.importorskip("napari.layers.labels.labels")

from napari_mambahome.panels.interactive import edits_out_of_object  # noqa: E402

_MaskedPaintAtom = napari_labels._MaskedPaintAtom
LIVER = 5  # TotalSegmentator's class id (shared data README)


def _reference(atoms, base, shown, class_id):
    """The former per-voxel computation: every voxel an atom changed, once (np.unique), left with another class by
    ``base``; returns (those voxels as a bool volume, how many the object holds)."""
    shape = base.shape
    voxels = []
    for atom in atoms:
        if isinstance(atom, _MaskedPaintAtom):
            lo = np.asarray([k.start for k in atom.slice_key])
            hi = np.asarray([k.stop for k in atom.slice_key])
            mask = np.ones(tuple(hi - lo), bool) if atom.mask is None else atom.mask
            voxels.append(np.argwhere(mask) + lo)
        else:
            voxels.append(np.stack([np.ravel(k) for k in np.broadcast_arrays(*atom[0])], axis=1))
    voxels = np.concatenate(voxels)
    flat = np.unique(np.ravel_multi_index(tuple(voxels.T), shape))
    out = np.zeros(shape, bool)
    out.flat[flat] = True
    out &= base != class_id
    return out, int(np.count_nonzero(out & (shown != 0)))


def _as_volume(parts, shape):
    out = np.zeros(shape, bool)
    for region, edited in parts:
        assert not out[region][edited].any()  # the boxes are disjoint: no voxel counted twice
        out[region] |= edited
    return out


def _masked(lo, mask, value):
    key = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, mask.shape))
    return _MaskedPaintAtom(key, mask, np.zeros(int(mask.sum()), np.uint8), value)


def test_the_same_voxels_as_the_per_voxel_computation_for_overlapping_and_far_apart_edits():
    rng = np.random.default_rng(4)
    shape = (40, 50, 60)
    shown = np.zeros(shape, np.uint8)
    shown[8:30, 10:40, 12:50] = 1  # the object
    base = shown.copy()
    atoms = []
    # brush dabs that overlap each other (one stroke), an eraser dab and a dab of another class in the object, a
    # whole-box atom (mask None), a dab of the object's own class (takes nothing out), a dab far away outside the
    # object, and an index-form atom (napari's data_setitem, as the Correct helpers write)
    for lo, value in [((10, 12, 14), 0), ((12, 14, 16), 0), ((20, 30, 40), 2), ((25, 20, 20), 1), ((1, 1, 1), 0)]:
        mask = rng.random((6, 7, 8)) < 0.6
        atom = _masked(lo, mask, value)
        atoms.append(atom)
        base[atom.slice_key][mask] = value
    whole = (slice(5, 9), slice(36, 44), slice(45, 55))
    atoms.append(_MaskedPaintAtom(whole, None, base[whole].copy(), 3))
    base[whole] = 3
    index = (np.array([15, 15, 29, 39]), np.array([20, 21, 39, 49]), np.array([30, 30, 49, 59]))
    atoms.append((index, base[index].copy(), np.uint8(0)))
    base[index] = 0

    parts, taken = edits_out_of_object(atoms, base, shown, 1)
    expected, expected_taken = _reference(atoms, base, shown, 1)
    np.testing.assert_array_equal(_as_volume(parts, shape), expected)
    assert taken == expected_taken > 0
    # the far dab and the object's box are not read as one box spanning both
    assert len(parts) >= 3


def test_nothing_is_taken_out_by_edits_outside_the_object_or_of_its_own_class():
    shape = (20, 20, 20)
    shown = np.zeros(shape, np.uint8)
    shown[5:10, 5:10, 5:10] = 1
    base = shown.copy()
    own = _masked((6, 6, 6), np.ones((2, 2, 2), bool), 1)
    outside = _masked((15, 15, 15), np.ones((2, 2, 2), bool), 0)
    base[15:17, 15:17, 15:17] = 0
    parts, taken = edits_out_of_object([own, outside], base, shown, 1)
    assert taken == 0
    # the edit outside is still listed: a prediction queued before the step may have drawn the object there since
    assert _as_volume(parts, shape)[15:17, 15:17, 15:17].all()


def test_a_bucket_fill_of_a_ct_sized_liver_is_found_well_within_a_gui_frame(shared_data):
    from napari.layers import Labels

    path = shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    coarse = np.asarray(nib.load(str(path)).dataobj).astype(np.uint8)
    labels = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)  # 3 mm -> 1 mm: 366x303x90, a CT's size in voxels
    shown = (labels == LIVER).astype(np.uint8)  # the object being prompted: the liver, class 5
    assert shown.sum() > 500_000
    layer = Labels(labels.copy())
    layer.n_edit_dimensions = 3
    layer.contiguous = False  # napari's bucket fill of every liver voxel: erase the liver
    atoms = []
    layer.events.paint.connect(lambda event: atoms.extend(event.value))
    layer.fill(tuple(int(c) for c in np.argwhere(shown)[0]), 0)
    base = np.asarray(layer.data)
    assert atoms and not (base == LIVER).any()

    expected, expected_taken = _reference(atoms, base, shown, LIVER)
    best = float("inf")
    for _ in range(3):  # the best of 3: the machine is shared, a stall of another process is not ours
        start = time.perf_counter()
        parts, taken = edits_out_of_object(atoms, base, shown, LIVER)
        best = min(best, time.perf_counter() - start)
    assert taken == expected_taken == int(shown.sum())
    np.testing.assert_array_equal(_as_volume(parts, base.shape), expected)
    # the former per-voxel np.unique took about 0.9 s for these 1 M voxels; this takes about 5 ms
    assert best < 0.1, f"{best * 1000:.0f} ms on the GUI thread for a {int(shown.sum())}-voxel fill"
