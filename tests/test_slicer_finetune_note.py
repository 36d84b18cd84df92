"""The Slicer module shows a server job's ``note`` (no class name shared with the saved cases) with its scores."""
from __future__ import annotations

from slicer_support import load_module  # noqa: F401 - skips first


def test_a_jobs_note_is_said_with_its_scores_or_alone():
    logic = load_module().MambaHoMELogic
    note = "model default segments ['organ'] but the saved cases are labelled ['ant']: no class name is shared"
    assert logic.score_text({"state": "done", "scores": None, "note": note}) == f"Note: {note}"
    made = logic.score_text({"state": "done", "scores": None, "not_scored": "cancelled", "model_id": "m", "note": note})
    assert made.startswith("m was made but not scored: cancelled.") and made.endswith(f"Note: {note}")
    scored = {"state": "done", "note": note, "warning": None,
              "scores": {"metric": "dice", "where": "1 held-out case", "mean_after": 0.1, "mean_before": 0.0,
                         "compared_with": "default", "before": {"ant": 0.0}, "after": {"ant": 0.1}}}
    text = logic.score_text(scored)
    assert "new 0.10 vs 0.00 for default" in text and text.endswith(f"Note: {note}")
    assert logic.score_text({"state": "done", "scores": None}) == ""
