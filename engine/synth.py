"""Synthetic CT-like and MR-like phantoms with labelled structures.

Used by tests (no data download), the napari sample data and ``mambahome synth`` (an nnU-Net v2
raw dataset to try the whole loop end to end). A phantom is a body ellipsoid with 2-4 smooth,
randomly placed structures of different sizes and intensities (the last one touches the first,
like a lesion on an organ) on a scanner-like, non-identity grid.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from engine.io import Volume, save_volume, write_json_atomic
from engine.progress import CancelToken, ProgressCallback, check, report

SYNTH_MARK = "mambahome synth:"
"""The start of the ``description`` of a ``dataset.json`` this module wrote: only such a folder is replaced."""

STRUCTURE_NAMES = ("organ", "vessel", "gland", "lesion")


@dataclass
class Phantom:
    """A synthetic labelled volume.

    Attributes:
        image: float32 ``(I, J, K)``; CT in HU, MR in arbitrary units (0..~800).
        label: uint8 ``(I, J, K)``, 0 background, 1..n structures.
        affine: ``(4, 4)`` voxel-to-world, with flips and an offset like a real scan.
        class_names: index = label value, ``class_names[0] == "background"``.
        modality: ``"CT"`` or ``"MR"``.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    class_names: List[str]
    modality: str
    spacing: Tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    def __iter__(self) -> Iterator:
        # allows ``image, label, affine, class_names = make_phantom(...)``
        return iter((self.image, self.label, self.affine, self.class_names))

    def to_volumes(self) -> Tuple[Volume, Volume]:
        """``(image Volume, label Volume)`` on the phantom's grid."""
        image = Volume.from_array(self.image, self.affine)
        label = Volume.from_array(self.label, self.affine)
        return image, label


def phantom_class_names(num_structures: int) -> List[str]:
    return ["background"] + list(STRUCTURE_NAMES[:num_structures])


def _smooth_blob(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of an ellipsoid whose surface is gently perturbed (organs are not perfect ellipsoids)."""
    rel = (coords - centre[:, None, None, None]) / radii[:, None, None, None]
    r = np.sqrt((rel ** 2).sum(0))
    # low-frequency angular perturbation of the radius, +-15 %
    dirs = rel / np.maximum(r, 1e-6)
    a, b, c = rng.normal(size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    bump = 0.15 * np.tanh(a * np.sin(2 * dirs[0] + phase[0]) + b * np.sin(2 * dirs[1] + phase[1])
                          + c * np.sin(2 * dirs[2] + phase[2]))
    return r <= 1.0 + bump


def make_phantom(shape: Sequence[int] = (64, 64, 64), modality: str = "CT", seed: int = 0,
                 spacing: Sequence[float] = (1.5, 1.5, 2.0), num_structures: int = 3) -> Phantom:
    """Build one synthetic labelled volume.

    Args:
        shape: ``(I, J, K)`` voxels (each >= 16).
        modality: ``"CT"`` (HU: air -1000, fat -100, soft tissue 40, structures 60..150, noise
            ~20 HU) or ``"MR"`` (0..~800, T1-like contrasts with bright fat, smooth bias field,
            Rician noise).
        seed: placement, shapes, intensities and noise all follow it.
        spacing: voxel size in mm along the array axes.
        num_structures: 2-4 labelled structures.

    Returns:
        :class:`Phantom`.
    """
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3 sizes >= 16, got {shape}")
    if not 2 <= num_structures <= 4:
        raise ValueError(f"num_structures must be 2-4, got {num_structures}")
    modality = modality.upper()
    if modality == "MRI":
        modality = "MR"
    if modality not in ("CT", "MR"):
        raise ValueError(f"phantom modality must be 'CT' or 'MR', got {modality!r}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or spacing_arr.min() <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    rng = np.random.default_rng(seed)

    # physical coordinates (mm) relative to the volume centre
    extent = np.asarray(shape) * spacing_arr
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing_arr)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))

    body_radii = extent * np.array([0.45, 0.40, 0.48])
    body_rel = np.sqrt((((coords / body_radii[:, None, None, None]) ** 2).sum(0)))
    body = body_rel <= 1.0
    fat = body & (body_rel > 0.85)  # subcutaneous fat layer

    label = np.zeros(shape, dtype=np.uint8)
    # radii as a fraction of the body, from large to small so sizes differ clearly
    size_fracs = np.sort(rng.uniform(0.12, 0.30, size=num_structures))[::-1]
    size_fracs[-1] = min(size_fracs[-1], 0.14)
    # at least ~2.5 voxels radius so a structure survives a 32^3 phantom
    min_radius = 2.5 * spacing_arr
    first_centre = first_radii = None
    for idx in range(num_structures):
        radii = np.maximum(body_radii * size_fracs[idx] * rng.uniform(0.8, 1.2, size=3), min_radius)
        if idx == num_structures - 1 and first_centre is not None:
            # touch the first structure: centre just outside its surface in a random direction
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            centre = first_centre + direction * (first_radii + radii * 0.6)
            mask = _smooth_blob(coords, centre, radii, rng) & body & ~fat
        else:
            # keep the whole structure inside the inner body, and apart from the ones placed so far
            # (overlaps would cut structures into fragments); best of a few random placements
            room = np.maximum(body_radii * 0.8 - radii, 0.0) / np.sqrt(3)
            best = None
            for _attempt in range(20):
                centre = rng.uniform(-room, room)
                candidate = _smooth_blob(coords, centre, radii, rng) & body & ~fat
                overlap = int((candidate & (label > 0)).sum())
                if best is None or overlap < best[0]:
                    best = (overlap, centre, candidate)
                if overlap == 0:
                    break
            _, centre, mask = best
        if mask.sum() < 8:  # squeezed out by the body edge: fall back to a small blob at the centre
            mask = _smooth_blob(coords, np.zeros(3), np.maximum(radii, min_radius * 1.5), rng) & body
        label[mask & (label == 0)] = idx + 1
        if idx == 0:
            first_centre, first_radii = centre, radii

    if modality == "CT":
        image = np.full(shape, -1000.0, dtype=np.float64)
        image[body] = 40.0
        image[fat] = -100.0
        levels = rng.permutation(np.linspace(60.0, 150.0, 4))[:num_structures]
        for idx, hu in enumerate(levels, start=1):
            image[label == idx] = hu + rng.normal(0, 5)
        image = gaussian_filter(image, sigma=0.7)  # scanner point spread
        image += rng.normal(0.0, 20.0, size=shape)
    else:
        image = np.zeros(shape, dtype=np.float64)
        image[body] = 300.0
        image[fat] = 650.0  # T1: fat is bright, the opposite of CT
        levels = rng.permutation(np.array([120.0, 220.0, 450.0, 560.0]))[:num_structures]
        for idx, value in enumerate(levels, start=1):
            image[label == idx] = value + rng.normal(0, 10)
        image = gaussian_filter(image, sigma=0.7)
        # smooth multiplicative bias field (receive-coil sensitivity), 0.75..1.25
        field_lowres = rng.normal(size=(3, 3, 3))
        from scipy.ndimage import zoom

        bias = zoom(field_lowres, [n / 3.0 for n in shape], order=3)[: shape[0], : shape[1], : shape[2]]
        bias = 1.0 + 0.25 * np.tanh(bias / 2.0)
        image *= bias
        sigma = 15.0  # Rician noise: magnitude of a complex signal with Gaussian noise
        image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)

    # scanner-like geometry: first two axes flipped (LPS storage as DICOM converters write it),
    # origin so the volume centre lies near the world origin
    affine = np.diag([-spacing_arr[0], -spacing_arr[1], spacing_arr[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + rng.uniform(-20, 20, size=3)
    return Phantom(image=image.astype(np.float32), label=label, affine=affine,
                   class_names=phantom_class_names(num_structures), modality=modality,
                   spacing=tuple(float(s) for s in spacing_arr))  # type: ignore[arg-type]


def sample_volume(modality: str = "CT") -> Tuple[Volume, Volume]:
    """A quick (< 1 s) phantom for the napari sample data: ``(image Volume, label Volume)``."""
    return make_phantom((64, 64, 48), modality=modality, seed=0).to_volumes()


def write_phantom_dataset(out: Path, cases: int, modality: str = "CT", shape: Sequence[int] = (64, 64, 64),
                          seed: int = 0, num_structures: int = 3, spacing: Sequence[float] = (1.5, 1.5, 2.0),
                          overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> Path:
    """Write an nnU-Net v2 raw dataset of phantoms.

    Layout: ``dataset.json`` (channel_names, labels name->id, numTraining, file_ending),
    ``imagesTr/phantom_XXX_0000.nii.gz``, ``labelsTr/phantom_XXX.nii.gz``. Case ``i`` uses seed
    ``seed + i``. ``dataset.json`` is written last, so an interrupted run is not a dataset.

    Returns:
        the dataset folder.
    """
    out = Path(out)
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    _make_room(out, overwrite)
    class_names = phantom_class_names(num_structures)
    for i in range(cases):
        check(cancel)
        case_id = f"phantom_{i:03d}"
        ph = make_phantom(shape, modality=modality, seed=seed + i, spacing=spacing, num_structures=num_structures)
        image, label = ph.to_volumes()
        save_volume(out / "imagesTr" / f"{case_id}_0000.nii.gz", image.data, image)
        save_volume(out / "labelsTr" / f"{case_id}.nii.gz", label.data, image)
        report(progress, i + 1, cases, f"wrote {case_id}")
    write_json_atomic(out / "dataset.json", {
        "name": f"Synthetic {ph.modality} phantoms",
        "description": f"{SYNTH_MARK} {cases} {ph.modality} phantoms, shape {list(shape)}, seed {seed}",
        "channel_names": {"0": ph.modality},
        "labels": {name: idx for idx, name in enumerate(class_names)},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    })
    return out


def _make_room(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding anything but a phantom dataset written here (the phantoms were written among a user's
    own files, and ``--overwrite`` on a real dataset replaced its dataset.json and left its cases beside the
    phantoms: a folder that no longer loads); with ``overwrite``, remove such a phantom dataset first, so the new one
    is not mixed with the old one's cases.

    Raises:
        ValueError: naming the folder and what is in it.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give a new or empty folder for the phantom dataset")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        description = str(json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("description", ""))
    except (OSError, ValueError, AttributeError):
        description = ""
    ours = {out / "dataset.json", out / "imagesTr", out / "labelsTr"}
    files_ours = all(f.name.startswith("phantom_") and f.name.endswith(".nii.gz")
                     for folder in ("imagesTr", "labelsTr") if (out / folder).is_dir()
                     for f in (out / folder).iterdir())
    if not description.startswith(SYNTH_MARK) or not files_ours or set(out.iterdir()) - ours:
        raise ValueError(f"{out}: holds files that are not a phantom dataset written by `mambahome synth`; give a "
                         "new or empty folder (nothing there was changed)")
    if not overwrite:
        raise ValueError(f"{out}: already holds a phantom dataset; choose another folder or pass --overwrite to "
                         "replace it")
    for folder in ("imagesTr", "labelsTr"):
        shutil.rmtree(out / folder, ignore_errors=True)
    (out / "dataset.json").unlink(missing_ok=True)


def _cli(args: argparse.Namespace) -> int:
    out = write_phantom_dataset(Path(args.out), args.cases, modality=args.modality, shape=args.shape,
                                seed=args.seed, num_structures=args.structures, overwrite=args.overwrite,
                                progress=lambda d, t, m: print(f"[{d}/{t}] {m}"))
    print(f"nnU-Net v2 raw dataset written to {out}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic CT/MR phantom dataset (nnU-Net v2 raw layout)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=8, help="number of cases")
    p.add_argument("--modality", choices=("CT", "MR"), default="CT")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("I", "J", "K"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structures", type=int, default=3, help="labelled structures per phantom (2-4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=_cli)
