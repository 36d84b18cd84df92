"""A fine-tuned version that finds none of the classes on the cases it was scored on is said plainly.

Found walking the loop on real hippocampus MRI (3 corrected cases, the bundled phantom model, a short CPU budget of
40 steps): the new classes (anterior, posterior) start untrained, the new version scored Dice 0.00 on every class,
was selected at once, and the next scan's Segment said only "nothing found". The parent also scored 0.00 on these
classes (it never had them), so "scores below its parent" did not fire, and nothing told the annotator that the
model now in use segments nothing, or what to do about it.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk2_finetune_finds_nothing.py``.
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)


@pytest.mark.gui
def test_a_new_version_scoring_zero_everywhere_is_said_with_what_to_do(viewer_widget):
    from engine.scoring import scored_where

    _, widget = viewer_widget
    panel = widget.panels["finetune"]
    where = scored_where(3, False, 3)
    scores = {"before": {"anterior": 0.0, "posterior": 0.0}, "after": {"anterior": 0.0, "posterior": 0.0},
              "metric": "dice", "clicks": None}
    panel.show_finetune_result("phantoms-v1", "ft-1-step40", scores, where, "Training 82.1 s, scoring 2.7 s. ")
    text = panel.finetune_result.text()
    assert text.startswith("ft-1-step40 selected. Training 82.1 s, scoring 2.7 s. ")
    assert "finds none of anterior, posterior" in text, text
    assert "train longer" in text and "choose phantoms-v1 in the Versions list" in text, text
    assert text.endswith("Dice per class on the 3 training case(s) (too few cases to hold some out):"), text


@pytest.mark.gui
def test_a_new_version_finding_some_classes_gets_no_such_note(viewer_widget):
    from engine.scoring import scored_where

    _, widget = viewer_widget
    panel = widget.panels["finetune"]
    where = scored_where(3, False, 3)
    scores = {"before": {"anterior": 0.0, "posterior": 0.0}, "after": {"anterior": 0.41, "posterior": 0.0},
              "metric": "dice", "clicks": None}
    panel.show_finetune_result("phantoms-v1", "ft-1-step200", scores, where, "")
    assert panel.finetune_result.text() == ("ft-1-step200 selected. Dice per class on the 3 training case(s) (too "
                                            "few cases to hold some out):")
    # a version with no parent to go back to still hears it finds nothing
    scores["after"]["anterior"] = 0.0
    panel.show_finetune_result(None, "ft-2-step5", scores, where, "")
    text = panel.finetune_result.text()
    assert "finds none of anterior, posterior" in text and "train longer" in text and "Versions list" not in text
