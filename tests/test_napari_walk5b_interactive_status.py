"""An annotator's fifth walk: the Interactive section's count line ("object 1: 0 prompt(s), last prediction -;
0 object(s) accepted") wraps to two lines in the dock of a 1600x1000 window, but its row kept the height of one:
the second line was cut at the bottom of the section's box.

Run under a virtual display: ``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest
tests/test_napari_walk5b_interactive_status.py``.
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


def _fully_shown(label, panel):
    needed = label.heightForWidth(label.width())
    bottom = label.mapTo(panel, label.rect().bottomLeft()).y()
    return label.height() >= needed and bottom <= panel.contentsRect().bottom(), (label.height(), needed, bottom,
                                                                                  panel.contentsRect())


def test_the_interactive_count_line_is_not_cut_in_a_1600x1000_window(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    viewer.window._qt_window.resize(1600, 1000)
    phantom_layer(viewer)
    panel = widget.panels["interactive"]
    label = panel.count_label
    qtbot.wait(300)
    assert "object(s) accepted" in label.text()
    assert label.heightForWidth(label.width()) > label.fontMetrics().height() * 1.5  # it does wrap here
    ok, detail = _fully_shown(label, panel)
    assert ok, detail
    # a longer line (queued prompts, a slow prediction) still fits after the layout follows
    panel.last_latency, panel.objects_accepted = 12.345, 11
    panel._show_counts()
    qtbot.wait(200)
    ok, detail = _fully_shown(label, panel)
    assert ok, detail
    # the dock does not grow much: the section is at most a line or two taller than its other rows need
    assert panel.height() < 420, panel.height()
