"""The first window of a prompt holds the prompt: boxes and scribbles larger than the window start zoomed out.

A scribble drawn along a long structure (or a painted region) used to start at zoom 1 like a point, so the
first prediction was cut at the window and only the zoom-out (one network pass per step, and only when the
prediction touched a window face) could recover it. Scribbles now start at the zoom that holds their voxels
around their centre voxel with the boxes' margin (a quarter), capped at the boxes' maximum zoom; points are
unchanged. Like boxes, the rule ignores the prompt's sign.

Deterministic stand-in networks passed as ``(model, metadata)``, as in tests/test_interactive.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.interactive import InteractiveSession, PromptEncoding
from engine.interactive.prompts import make_scribble
from engine.interactive.session import MAX_ZOOM, ZOOM_STEP
from engine.preprocess import Preprocessing

ENC = PromptEncoding()
SHAPE = (160, 70, 60)


def _channel(x: torch.Tensor, name: str) -> torch.Tensor:
    return x[:, 1 + ENC.channels.index(name)]


class Echo(nn.Module):
    """Object = (previous mask or a positive prompt) and no negative prompt; with ``border`` the outer
    ``border`` voxels of the window are always background, so the prediction never touches a window face
    and the zoom-out never runs (the first window is the only one)."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def __init__(self, border: int = 0) -> None:
        super().__init__()
        self.border = border
        self.shapes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        pos = torch.stack([_channel(x, n) for n in ("previous_mask", "point+", "box+", "scribble+")]).amax(0)
        neg = torch.stack([_channel(x, n) for n in ("point-", "box-", "scribble-")]).amax(0)
        obj = (pos > 0.5) & (neg == 0)
        if self.border:
            b = self.border
            inner = torch.zeros_like(obj)
            inner[:, b:-b, b:-b, b:-b] = True
            obj &= inner
        score = torch.where(obj, 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


class Nothing(nn.Module):
    """Background everywhere: the window it saw is cleared, and it never zooms out."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        score = -torch.ones_like(x[:, :1])
        return torch.cat([-score, score], dim=1)


def _session(model, shape=SHAPE, spacing=(1.5, 1.5, 2.0), target_spacing=None):
    pp = Preprocessing.for_modality("CT").to_dict()
    pp["target_spacing"] = target_spacing
    metadata = {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": [32, 32, 32],
                "preprocessing": pp, "modality": "CT", "class_names": ["background", "object"]}
    return InteractiveSession((model, metadata), np.zeros(shape, np.float32), device="cpu", spacing=spacing)


def _ladder(need: float) -> float:
    zoom = 1.0
    while zoom < need and zoom < MAX_ZOOM:
        zoom = min(zoom * ZOOM_STEP, MAX_ZOOM)
    return zoom


def _covers(window, voxels) -> bool:
    lo = np.asarray([s.start for s in window])
    hi = np.asarray([s.stop for s in window])
    return bool(np.all(voxels >= lo) and np.all(voxels < hi))


def test_a_long_scribble_is_seen_whole_in_the_first_window():
    model = Echo()
    session = _session(model)
    session.add_point((155, 35, 30))  # a point first, far off: a later prompt's window is sized by that prompt
    assert model.shapes == [(1, 8, 32, 32, 32)]
    model.shapes.clear()
    up = session.add_scribble([(45, 35, 30), (114, 35, 30)])  # 70 voxels along i, the window is 32
    voxels = make_scribble([(45, 35, 30), (114, 35, 30)], SHAPE).voxels
    # 1.25 * 71 / 32 = 2.8 -> 3.375: one pass, no zoom-out ladder (it used to take 1, 1.5, 2.25, ...)
    assert len(model.shapes) == 1 and up.zoom == pytest.approx(ZOOM_STEP ** 3)
    assert _covers(up.window, voxels)
    assert session.mask[tuple(voxels.T)].all()  # nothing of the stroke is cut


def test_a_large_painted_scribble_is_not_cut_even_when_the_zoom_out_never_runs():
    """A model whose prediction never touches the window's faces never zooms out: a scribble larger than
    the window used to leave a mask cut at the zoom-1 window for good."""
    model = Echo(border=1)
    session = _session(model)
    paint = np.zeros(SHAPE, np.uint8)
    paint[40:120, 20:50, 25:35] = 1  # 80 x 30 x 10 voxels painted
    up = session.add_scribble(paint)
    assert len(model.shapes) == 1
    assert up.zoom == pytest.approx(_ladder(1.25 * 81 / 32))  # the painted region's reach from its centre voxel
    assert _covers(up.window, np.argwhere(paint))
    # with a one-window-voxel rim (zoom 3.4 -> ~3.4 volume voxels) all of the painted region is kept
    assert session.mask[paint.astype(bool)].mean() > 0.99


def test_a_curved_scribble_is_held_around_its_centre_voxel_not_its_bounding_box_middle():
    """The window is centred on the scribble voxel nearest the centroid: a stroke whose voxels crowd at one
    end needs the window to reach its far end from there, more than its bounding box's size."""
    model = Nothing()
    session = _session(model)
    initial = np.zeros(SHAPE, np.uint8)
    initial[30:130, 10:60, 10:50] = 1
    session.set_initial_mask(initial)  # so that a negative prompt runs the network
    stroke = np.zeros(SHAPE, np.uint8)
    stroke[60:98, 35, 30] = 1  # a 38-voxel line: its bounding box alone fits zoom 1.5 (1.25 * 38 / 32 = 1.48)
    stroke[92:98, 30:41, 25:36] = 1  # a blob at its high end pulls the centre voxel there
    up = session.add_scribble(stroke, positive=False)
    assert len(model.shapes) == 1 and up.zoom > ZOOM_STEP
    assert _covers(up.window, np.argwhere(stroke))
    assert session.mask[stroke.astype(bool)].sum() == 0  # the whole stroke was removed


def test_a_short_scribble_and_a_point_keep_the_native_window():
    model = Echo()
    session = _session(model)
    up = session.add_scribble([(70, 35, 30), (89, 35, 30)])  # 20 voxels: 1.25 * 21 / 32 < 1
    assert up.zoom == 1.0 and model.shapes == [(1, 8, 32, 32, 32)]
    assert [s.stop - s.start for s in up.window] == [32, 32, 32]
    session.reset()
    model.shapes.clear()
    up = session.add_point((80, 35, 30))
    assert up.zoom == 1.0 and model.shapes == [(1, 8, 32, 32, 32)]


def test_a_negative_scribble_follows_the_negative_box_rule():
    """Boxes start zoomed out whatever their sign (a negative box must be seen whole to remove along all of
    it); a negative scribble does the same, and on an empty object neither runs the network."""
    initial = np.zeros(SHAPE, np.uint8)
    initial[20:140, 10:60, 10:50] = 1
    zooms = {}
    for kind in ("box", "scribble"):
        model = Nothing()
        session = _session(model)
        empty = session.add_scribble([(40, 35, 30), (109, 35, 30)], positive=False) if kind == "scribble" else \
            session.add_box((40, 20, 30), (109, 50, 30), positive=False)
        assert empty.window is None and model.shapes == []  # nothing to remove: no network, no window
        session.set_initial_mask(initial)
        up = session.add_scribble([(40, 35, 30), (109, 35, 30)], positive=False) if kind == "scribble" else \
            session.add_box((40, 20, 30), (109, 50, 30), positive=False)
        assert len(model.shapes) == 1
        assert _covers(up.window, np.asarray([(40, 35, 30), (109, 35, 30)]))
        zooms[kind] = up.zoom
    assert zooms["box"] == zooms["scribble"] == pytest.approx(ZOOM_STEP ** 3)  # 1.25 * 70 / 32 = 2.7


def test_the_scribble_extent_is_measured_in_network_voxels():
    """At half the model's voxel size a stroke spans half as many network voxels: the start zoom halves."""
    model = Echo()
    session = _session(model, spacing=(0.75, 0.75, 1.0), target_spacing=[1.5, 1.5, 2.0])
    assert session.scale == (2.0, 2.0, 2.0)
    up = session.add_scribble([(45, 35, 30), (114, 35, 30)])  # 70 volume voxels = 35 network voxels
    assert up.zoom == pytest.approx(_ladder(1.25 * 71 / 2 / 32)) == pytest.approx(ZOOM_STEP)
    assert len(model.shapes) == 1 and _covers(up.window, np.asarray([(45, 35, 30), (114, 35, 30)]))
