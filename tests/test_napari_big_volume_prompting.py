"""Prompting on a large volume in the dock: a prompt does no whole-volume work in memory on the GUI thread.

On a 512x512x400 CT (a 100 MB labels layer) every new whole-volume array the GUI thread wrote cost it 0.5-0.6 s on a
2-core VM, nearly all of it the kernel mapping fresh pages (benchmarks/napari_big_volume.py,
benchmarks/results/napari-big-volume-2026-12-05-cpu2.md): the first click of every object copied the labels into new
memory (the labels the object is drawn over), and a scribble reordered its whole-volume mask into the file's voxel
order (a comparison and a contiguous copy). Measured here with ``tracemalloc`` (numpy reports its arrays to it), which
does not depend on the machine's speed: what the GUI thread's call of a prompt allocates, against the labels' size.
The volume is the shared abdomen CT tiled to 256x256x200, opened with the plugin's reader; the prompts go through
the deterministic stand-in network of tests/test_interactive.py, so the drawn objects are known.

    xvfb-run -a python -m pytest tests/test_napari_big_volume_prompting.py
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, Echo, _ball_in_display, _idle, interactive_checkpoint,
)

pytestmark = pytest.mark.gui

SHAPE = (256, 256, 200)  # file order (i, j, k)


@pytest.fixture(scope="module")
def big_ct(shared_data, tmp_path_factory):
    """The shared abdomen CT tiled to SHAPE (its own voxel size and orientation), an uncompressed NIfTI."""
    import nibabel as nib

    source = nib.load(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))
    data = np.asanyarray(source.dataobj).astype(np.int16)
    reps = [-(-n // s) for n, s in zip(SHAPE, data.shape)]
    tiled = np.tile(data, reps)[tuple(slice(0, n) for n in SHAPE)]
    path = tmp_path_factory.mktemp("bigct") / "big_ct.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(tiled), source.affine, source.header), str(path))
    return path


@pytest.fixture
def prompting_big(viewer_widget, interactive_checkpoint, big_ct, qtbot):
    """The dock on the big CT, prompting through GuidanceEcho (each prediction takes ``DELAY`` s), with tracemalloc
    on. tracemalloc is started and stopped only while no prompt worker runs (turning it on or off while another thread
    frees memory can crash Python 3.11)."""
    from qtpy.QtCore import QThreadPool

    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo(delay=DELAY)
    image = viewer.open(str(big_ct), plugin="napari-mambahome")[0]
    assert tuple(sorted(np.shape(image.data))) == tuple(sorted(SHAPE))
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    tracemalloc.start()
    try:
        yield viewer, widget, panel, image
        _idle(qtbot, panel)
        # closing the viewer removes the labels, which queues a (slow) reset of the object: done here, while the
        # viewer's signals still exist for the worker to report to
        viewer.layers.clear()
        _idle(qtbot, panel)
        qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=30_000)
    finally:
        tracemalloc.stop()


DELAY = 1.0
"""Seconds of each stand-in prediction: a prompt measured right after the one before waits behind it, so the peak that
tracemalloc (which traces every thread) sees is the GUI thread's."""


def _allocated_by(call) -> int:
    """Peak bytes newly allocated (numpy arrays included) while ``call`` runs."""
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    assert call()
    _, peak = tracemalloc.get_traced_memory()
    return peak - before


def _start(panel, qtbot):
    assert panel.start()
    qtbot.waitUntil(lambda: panel.ctx is not None and panel.ctx.ready, timeout=60_000)
    _idle(qtbot, panel)


def _centre(image, shift=(0, 0, 0)):
    return tuple(int(s) // 2 + d for s, d in zip(np.shape(image.data), shift))


def test_the_first_click_of_each_object_allocates_no_whole_volume_on_the_gui_thread(prompting_big, qtbot):
    viewer, widget, panel, image = prompting_big
    volume_bytes = int(np.prod(SHAPE))  # the uint8 labels
    # labels of this scan already open (a segmentation to refine, labels opened from a file)
    labels = viewer.add_labels(np.zeros(np.shape(image.data), np.uint8), name="big labels", scale=image.scale,
                               translate=image.translate)
    labels.data[10:20, 10:20, 10:20] = 3  # another class, kept under the objects
    widget.session.set_labels(labels)
    widget.session.set_image(image)
    _start(panel, qtbot)

    first = _centre(image)
    took = _allocated_by(lambda: panel.add_point(np.asarray(first)))  # the worker starts sleeping in it
    _idle(qtbot, panel)
    assert took < volume_bytes // 10, f"the first click allocated {took} bytes on the GUI thread"
    assert panel.target is labels
    np.testing.assert_array_equal(np.asarray(labels.data) == 1, _ball_in_display(labels.data.shape, first, RADIUS))

    assert panel.accept_object()
    _idle(qtbot, panel)
    second = _centre(image, (0, 40, 40))
    took = _allocated_by(lambda: panel.add_point(np.asarray(second)))
    _idle(qtbot, panel)
    assert took < volume_bytes // 10, f"the next object's first click allocated {took} bytes on the GUI thread"
    # both objects drawn, the other class kept, and an undo of the new object's click leaves the first one as it was
    expected = _ball_in_display(labels.data.shape, first, RADIUS) | _ball_in_display(labels.data.shape, second, RADIUS)
    np.testing.assert_array_equal(np.asarray(labels.data) == 1, expected)
    assert (np.asarray(labels.data)[10:20, 10:20, 10:20] == 3).all()
    assert panel.undo()
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(labels.data) == 1, _ball_in_display(labels.data.shape, first, RADIUS))
    assert (np.asarray(labels.data)[10:20, 10:20, 10:20] == 3).all()


def test_a_scribble_is_reordered_in_the_worker_not_on_the_gui_thread(prompting_big, qtbot):
    viewer, widget, panel, image = prompting_big
    _start(panel, qtbot)
    z, y, x = _centre(image)
    stroke = np.zeros(np.shape(image.data), bool)
    stroke[z, y - 3:y + 4, x - 3:x + 4] = True
    # the object's labels are made by this first click, so the scribble's own cost is measured (queued behind it)
    assert panel.add_point(np.asarray((z, y - 40, x - 40)))
    took = _allocated_by(lambda: panel.add_scribble(stroke, positive=True))
    _idle(qtbot, panel)
    assert took < stroke.size // 10, f"a scribble allocated {took} bytes on the GUI thread"
    labels = np.asarray(panel.target.data)
    assert panel.interactions == 2 and labels[stroke].all()  # the stand-in draws the positive scribble
    # the prompt layer's own stroke is a scribble as well, answered as before: napari emits a mouse stroke's paint
    # event once the stroke is written (a lone ``paint`` call emits it before writing, which no mouse stroke does)
    with panel.scribbles_layer.block_history():
        panel.scribbles_layer.paint((z, y + 30, x + 30), 1)
    _idle(qtbot, panel)
    assert panel.interactions == 3 and np.asarray(panel.target.data)[z, y + 30, x + 30] != 0
