"""Work the plugin used to do on the GUI thread, now done off it or not at all (project rule: nothing over ~100 ms
on the GUI thread). What each change saved is measured in BENCHMARKS.md ("napari's share on the GUI thread");
these tests check the behaviour stays the same and the work stays where it was moved.

GUI tests run under a virtual display: ``xvfb-run -a python -m pytest tests/test_gui_stalls_plugin.py``.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture


# ---------------------------------------------------------------- the reader's initial contrast
def _arrays():
    rng = np.random.default_rng(5)
    ct = np.where(rng.random((40, 50, 60)) < 0.3, -1024, rng.integers(-200, 300, (40, 50, 60))).astype(np.float32)
    return {
        "CT-like float32 with ties (air)": ct,
        "a transposed, flipped display view": np.flip(np.transpose(ct, (2, 0, 1)), 1),
        "int16": rng.normal(300, 200, (30, 40, 50)).astype(np.int16),
        "float64": rng.random((30, 30, 30)),
        "sorted (a strided sample unlike the volume)": np.sort(rng.normal(0, 1, 30 * 40 * 50)).reshape(30, 40, 50),
        "constant": np.full((20, 30, 40), 7.0, np.float32),
        "uint8": rng.integers(0, 255, (20, 30, 40)).astype(np.uint8),
        "ties at both ends (air, saturated bone)": np.where(rng.random(ct.shape) < 0.02, 3071.0, ct).astype(np.float32),
        "integer steps (ties inside the brackets)": rng.integers(0, 40, (30, 40, 50)).astype(np.float32),
    }


@pytest.mark.parametrize("q", [(0.5, 99.5), (0.0, 100.0), (0.1, 50.0, 99.9)])
def test_the_readers_percentiles_are_numpys_on_a_volume_up_to_the_sample_size(q):
    from napari_mambahome import _reader

    for name, data in _arrays().items():
        expected = np.percentile(np.asarray(data, dtype=np.float32), list(q))
        np.testing.assert_allclose(_reader._percentiles(data, q), expected, rtol=1e-6, atol=0, err_msg=name)


def test_a_large_volumes_window_comes_from_a_sample_and_lies_within_a_tenth_of_a_percentile_point(monkeypatch):
    """A volume much larger than the sample is never copied whole (that float32 copy and its partition froze napari's
    File > Open); the sampled limits still lie between the volume's own 0.4th and 0.6th (99.4th, 99.6th)
    percentiles."""
    from napari_mambahome import _reader

    monkeypatch.setattr(_reader, "_SAMPLE_VOXELS", 2000)
    rng = np.random.default_rng(7)
    data = np.where(rng.random((60, 70, 80)) < 0.3, -1024, rng.normal(40, 300, (60, 70, 80))).astype(np.float32)
    seen = []
    real = np.percentile

    def percentile(a, *args, **kwargs):
        seen.append(np.size(a))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np, "percentile", percentile)
    lo, hi = _reader._percentiles(data, (0.5, 99.5))
    monkeypatch.setattr(np, "percentile", real)
    assert seen and max(seen) < data.size // 20
    assert real(data, 0.4) <= lo <= real(data, 0.6)
    assert real(data, 99.4) <= hi <= real(data, 99.6)


def test_an_mr_opens_with_numpys_percentile_window(shared_data):
    from napari_mambahome._reader import read_volumes

    import nibabel as nib

    path = shared_data / "abdomen_ct_mr" / "mr_image.nii.gz"
    [(data, kwargs, kind)] = read_volumes(path)
    assert kind == "image" and kwargs["metadata"].get("modality") != "CT"
    expected = np.percentile(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), [0.5, 99.5])
    np.testing.assert_allclose(kwargs["contrast_limits"], expected, rtol=1e-6)


# ---------------------------------------------------------------- Segment's result layer
@pytest.mark.gui
def test_the_segment_result_is_counted_in_the_worker_not_on_the_gui_thread(viewer_widget, qtbot, monkeypatch):
    """The classes the status line names come from np.unique over the whole result, a CT-sized pass that held the
    GUI thread. The worker counts them; the status line still names them."""
    viewer, widget = viewer_widget
    layer, _ = phantom_layer(viewer, shape=(40, 40, 40))
    calls = []
    real = np.unique

    def unique(a, *args, **kwargs):
        if np.ndim(a) == 3:
            calls.append((threading.current_thread() is threading.main_thread(), np.shape(a)))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np, "unique", unique)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    job = widget.panels["segment"].segment()
    assert job is not None
    wait_job(qtbot, widget)
    assert job.outcome == "done", widget.status_label.text()
    labels = viewer.layers[f"{layer.name} labels"]
    assert calls and not any(on_gui for on_gui, shape in calls if shape == labels.data.shape)
    present = [widget.session.last_prediction.class_names[v] for v in real(labels.data) if v]
    text = widget.status_label.text()
    assert text.startswith(f"'{labels.name}': ") and (", ".join(present) or "nothing found") in text


# ---------------------------------------------------------------- Start prompting
@pytest.fixture
def interactive_panel(viewer_widget, interactive_checkpoint, shared_data):  # noqa: F811 - fixture
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    [image] = viewer.open(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"), plugin="napari-mambahome")
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    return viewer, widget, panel, image


@pytest.mark.gui
def test_the_scribble_layer_gets_its_colours_once_at_creation(interactive_panel, monkeypatch):
    """Set after the layer was made, the scribble colours cost a second colour set-up and refresh of a CT-sized
    labels layer; given at creation the layer still shows 1 positive, 2 negative, 0 transparent."""
    from napari_mambahome.panels.interactive import NEGATIVE_COLOUR, POSITIVE_COLOUR, SCRIBBLES_NAME

    import napari.layers

    viewer, widget, panel, image = interactive_panel
    changes = []
    real_init = napari.layers.Labels.__init__

    def init(self, *args, **kwargs):  # every labels layer, however made (the scribbles' in a worker)
        real_init(self, *args, **kwargs)
        self.events.colormap.connect(lambda event: changes.append(self.name))

    monkeypatch.setattr(napari.layers.Labels, "__init__", init)
    assert panel.start()
    assert panel.scribbles_layer is viewer.layers[SCRIBBLES_NAME]  # reading it makes the staged layers at once
    scribbles = viewer.layers[SCRIBBLES_NAME]
    assert SCRIBBLES_NAME not in changes
    assert scribbles.data.dtype == np.uint8 and scribbles.data.shape == image.data.shape
    colours = scribbles.colormap.map(np.array([0, 1, 2]))
    assert colours[0][3] == 0
    np.testing.assert_allclose(colours[1][:3], _rgb(POSITIVE_COLOUR), atol=0.01)
    np.testing.assert_allclose(colours[2][:3], _rgb(NEGATIVE_COLOUR), atol=0.01)


def _rgb(colour):
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(colour)[0][:3]


@pytest.mark.gui
def test_a_restart_on_the_same_image_leaves_the_prompt_layers_transforms_alone(interactive_panel, shared_data):
    """Each scale or translate assignment recomputes a layer's transforms and redraws it, even with equal values; a
    restart on the same grid sets none, a start on another image's grid still moves the layers."""
    viewer, widget, panel, image = interactive_panel
    assert panel.start()
    layers = (panel.points_layer, panel.boxes_layer, panel.scribbles_layer)
    moved = []
    for layer in layers:
        layer.events.scale.connect(lambda event, name=layer.name: moved.append(("scale", name)))
        layer.events.translate.connect(lambda event, name=layer.name: moved.append(("translate", name)))
    assert panel.start()
    assert moved == []
    assert (panel.points_layer, panel.boxes_layer, panel.scribbles_layer) == layers  # reused, not made again
    [other] = viewer.open(str(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz"), plugin="napari-mambahome")
    assert not np.allclose(other.scale, image.scale) or not np.allclose(other.translate, image.translate)
    widget.session.set_image(other)
    assert panel.start()
    for layer in layers:
        np.testing.assert_allclose(layer.scale, other.scale)
        np.testing.assert_allclose(layer.translate, other.translate)
    assert panel.scribbles_layer.data.shape == other.data.shape and panel.scribbles_layer.data.dtype == np.uint8


@pytest.mark.gui
def test_refine_class_reorders_the_seed_mask_in_the_prompt_worker(interactive_panel, qtbot, monkeypatch):
    """Seeding an object from a class of the labels compared, copied and reordered the whole labels volume several
    times on the GUI thread; now one comparison and one copy stay there (the base the object is drawn over) and the
    mask's reordering into the file's voxel order runs in the prompt worker. The object and the other classes stay
    as before."""
    viewer, widget, panel, image = interactive_panel
    seed = np.zeros(np.shape(image.data), np.uint8)
    c = tuple(int(s) // 2 for s in seed.shape)
    seed[c[0] - 3:c[0] + 4, c[1] - 5:c[1] + 6, c[2] - 5:c[2] + 6] = 1
    seed[:2, :4, :4] = 2  # another class, untouched
    labels = viewer.add_labels(seed.copy(), name="auto", scale=image.scale, translate=image.translate)
    widget.session.set_labels(labels)
    assert panel.start()
    copies = []
    real = np.ascontiguousarray

    def ascontiguousarray(array, *args, **kwargs):
        if sorted(np.shape(array)) == sorted(seed.shape):  # a whole volume, either voxel order (prompts copy boxes)
            copies.append(threading.current_thread() is threading.main_thread())
        return real(array, *args, **kwargs)

    monkeypatch.setattr(np, "ascontiguousarray", ascontiguousarray)
    assert panel.refine_class()
    assert panel.base.dtype == seed.dtype and not panel.base[c] and panel.base[0, 0, 0] == 2
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=30_000)
    qtbot.wait(20)
    assert copies and not any(copies)  # the whole volume reordered off the GUI thread only
    np.testing.assert_array_equal(np.asarray(labels.data), seed)  # the seed is the object, class 2 kept
