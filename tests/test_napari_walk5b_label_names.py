"""An annotator's fifth walk: a label file that names no classes of its own took the selected model's names.

Opening the real upper-abdomen CT's TotalSegmentator labels (``ct_label_auto.nii.gz``, values up to 117, 1 spleen,
2 right kidney, 3 left kidney...) named values 1-3 after the model ("organ", "vessel", "gland"); a case saved without
renaming would then have trained "organ" on the spleen, silently (fine-tuning matches classes by name).

The rule now: a label file's names come from the file (a ``.seg.nrrd``'s segments, the label table of its NIfTI
header, this plugin's own class record written on saving), its saved case or ``dataset.json``; the selected model's
names only for a NIfTI this plugin marked as labels (``NIFTI_INTENT_LABEL``) whose values all fit the model's classes
(a segmentation saved by an earlier version). Anything else shows ``label N`` and the status line says the names are
unknown and how to name them (the Correct section's Rename). Labels made in the viewer (no file) still take the
model's names: their values mean what the annotator paints with them.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk5b_label_names.py``. The real data
is found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); those tests skip without it.
"""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    TINY_CLASSES, modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint,
    viewer_widget,
)

pytestmark = pytest.mark.gui


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-mambahome")[0]


def _plain_copy(source, target, values=None):
    """``source`` rewritten without its header's extensions (no label table) and with intent none; with ``values``,
    only voxels of those values kept."""
    image = nib.load(str(source))
    data = np.asarray(image.dataobj)
    if values is not None:
        data = np.where(np.isin(data, values), data, 0).astype(data.dtype)
    header = image.header.copy()
    header.extensions.clear()
    header.set_intent("none")
    nib.save(nib.Nifti1Image(data, image.affine, header), str(target))
    return target


def test_totalsegmentator_labels_are_not_named_after_the_model(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    labels = _open(viewer, shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz")
    names = widget.session.class_table(labels).names
    assert not set(names) & {"organ", "vessel", "gland"}, names[:5]
    # the file's NIfTI header carries its label table (a CIFTI/Caret extension): the real names
    assert names[1:4] == ["spleen", "kidney_right", "kidney_left"] and names[117] == "costal_cartilages"
    legend = [name for _, name, _ in widget.panels["correct"].legend.entries]
    assert "spleen" in legend and "organ" not in legend


def test_a_label_file_without_names_gets_generic_names_and_the_status_says_so(viewer_widget, shared_data,
                                                                              tmp_path):
    viewer, widget = viewer_widget
    seen = status_messages(widget)
    # values 1-3 only: they fit the model's three classes, but nothing says the model wrote them
    path = _plain_copy(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz", tmp_path / "seg.nii.gz", [1, 2, 3])
    labels = _open(viewer, path)
    table = widget.session.class_table(labels)
    assert table.names == ["background", "label 1", "label 2", "label 3"], table.names
    said = " ".join(seen)
    assert "seg" in said and "unknown" in said and "Rename" in said, seen


def test_labels_saved_by_the_plugin_reopen_with_their_names(viewer_widget, shared_data, tmp_path):
    from napari_mambahome._writer import write_labels

    viewer, widget = viewer_widget
    _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    labels = _open(viewer, _plain_copy(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz",
                                       tmp_path / "seg.nii.gz", [1, 2]))
    correct = widget.panels["correct"]
    assert correct.rename_class(1, "spleen") and correct.rename_class(2, "kidney_right")
    out = write_labels(str(tmp_path / "corrected.nii.gz"), labels.data, labels._get_state())[0]
    again = _open(viewer, out)
    assert widget.session.class_table(again).names == ["background", "spleen", "kidney_right"]

    # saved while the names were still unknown: they stay unknown, never the model's
    plain = _open(viewer, _plain_copy(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz",
                                      tmp_path / "other_seg.nii.gz", [1, 2]))
    out = write_labels(str(tmp_path / "unnamed.nii.gz"), plain.data, plain._get_state())[0]
    assert nib.load(out).header.get_intent()[0] == "label"
    again = _open(viewer, out)
    assert widget.session.class_table(again).names == ["background", "label 1", "label 2"]


def test_a_plugin_marked_label_file_within_the_models_classes_keeps_the_models_names(viewer_widget, shared_data,
                                                                                    tmp_path):
    """A segmentation saved by an earlier version (label intent, no class record): the model's names, as before."""
    viewer, widget = viewer_widget
    path = _plain_copy(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz", tmp_path / "old.nii.gz", [1, 2, 3])
    image = nib.load(str(path))
    header = image.header.copy()
    header.set_intent("label")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), str(path))
    labels = _open(viewer, path)
    assert widget.session.class_table(labels).names == TINY_CLASSES


def test_labels_made_in_the_viewer_still_take_the_models_names(viewer_widget):
    viewer, widget = viewer_widget
    hand = viewer.add_labels(np.zeros((8, 8, 8), np.uint8), name="hand")
    hand.data[0, 0, 0] = 1
    assert widget.session.class_table(hand).names == TINY_CLASSES


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_labels_of_a_scan_read_from_another_format_saved_as_nifti_reopen_as_labels_with_their_names(
        viewer_widget, shared_data, tmp_path, suffix):
    """The mark and the names were copied into the scan's own NIfTI header only: labels of an NRRD or MHA scan (no
    such header) saved as ``corrected.nii.gz`` reopened as an image layer, their names lost (an annotator's walk on
    the spinal cord T1 converted to MHA)."""
    import SimpleITK as sitk

    from napari_mambahome._writer import write_labels

    viewer, widget = viewer_widget
    scan = tmp_path / f"t1_spinal{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(shared_data / "spinal_cord_mri" / "t1_image.nii.gz")), str(scan))
    image = _open(viewer, scan)
    labels = viewer.add_labels(np.zeros(np.shape(image.data), np.uint8), name=f"{image.name} labels",
                               scale=image.scale, translate=image.translate, rotate=image.rotate,
                               metadata={k: v for k, v in image.metadata.items()})
    widget.session.set_image(image)
    widget.session.set_labels(labels)
    labels.data[5:9, 5:9, 5:9] = 1
    correct = widget.panels["correct"]
    assert correct.rename_class(1, "spinal cord")
    names = widget.session.class_table(labels).names
    out = write_labels(str(tmp_path / "corrected.nii.gz"), labels.data, labels._get_state())[0]
    assert nib.load(out).header.get_intent()[0] == "label"
    again = _open(viewer, out)
    assert type(again).__name__ == "Labels"
    assert widget.session.class_table(again).names == names and names[1] == "spinal cord"
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(labels.data))


def test_a_refused_save_says_why_not_only_that_the_plugin_is_no_writer(viewer_widget, shared_data, tmp_path,
                                                                      notifications):
    """npe2 takes a writer's ValueError for "not a writer of this file": saving labels as "a ü.nhdr" (NRRD headers
    are ASCII) said only "Given plugin 'napari-mambahome' is not a valid writer"; the reason now comes first."""
    viewer, widget = viewer_widget
    image = _open(viewer, shared_data / "spinal_cord_mri" / "t1_image.nii.gz")
    labels = viewer.add_labels(np.zeros(np.shape(image.data), np.uint8), name="cord labels", scale=image.scale,
                               translate=image.translate, metadata=dict(image.metadata))
    out = tmp_path / "saved"
    out.mkdir()
    with pytest.warns(UserWarning, match="not a valid writer"):
        written = labels.save(str(out / "a ü.nhdr"), plugin="napari-mambahome")
    assert written == [] and not list(out.iterdir())
    said = [m for s, m in notifications if s == "error"]
    assert any("could not save 'cord labels' as a ü.nhdr" in m and "save it as .nrrd" in m for m in said), said
