"""engine.scoring: which cases a fine-tune run is scored on, and when a new model is called weaker (the one
rule behind the napari plugin's local warning and the server job's ``warning``)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from engine.scoring import held_out_cases, means, scored_where, weaker, weaker_note


def test_a_new_model_is_weaker_only_on_the_classes_both_were_scored_on():
    assert weaker({"before": {"a": 0.8, "b": 0.6}, "after": {"a": 0.5, "b": 0.6}}) == pytest.approx((0.55, 0.7))
    assert weaker({"before": {"a": 0.5}, "after": {"a": 0.5}}) is None  # equal is not weaker
    assert weaker({"before": {"a": 0.9}, "after": {"b": 0.1}}) is None  # nothing shared: no comparison
    assert weaker({"before": {}, "after": {"a": 0.1}}) is None and weaker({}) is None
    # a class only the new model was scored on does not count
    assert weaker({"before": {"a": 0.4}, "after": {"a": 0.5, "b": 0.0}}) is None
    note = weaker_note("interactive", {"before": {"a": 0.66}, "after": {"a": 0.34}})
    assert note == ("The new model scores below interactive (0.34 vs 0.66): choose interactive as the prompt model "
                    "to keep prompting with it, or train longer.")
    assert "in the Interactive section" in weaker_note("v1", {"before": {"a": 1.0}, "after": {"a": 0.0}},
                                                       where="in the Interactive section")
    assert weaker_note("v1", {"before": {"a": 0.1}, "after": {"a": 0.2}}) == ""
    # an automatic model segments: the annotator chooses the old one again to keep segmenting with it
    assert weaker_note("default", {"before": {"a": 0.8}, "after": {"a": 0.6}}, interactive=False) == (
        "The new model scores below default (0.60 vs 0.80): choose default as the active model to keep segmenting "
        "with it, or train longer.")


def test_the_means_compared_are_over_the_classes_both_models_were_scored_on():
    assert means({"before": {"a": 0.8, "b": 0.6, "c": 0.1}, "after": {"a": 0.5, "b": 0.7}}) == pytest.approx((0.6, 0.7))
    assert means({"before": {}, "after": {"a": 0.5}}) is None and means({}) is None


def test_the_cases_scored_on_are_named_in_the_same_words_by_every_client():
    assert scored_where(2, True, 9) == "2 held-out case(s) not used for training"
    assert scored_where(3, False, 3) == "the 3 training case(s) (too few cases to hold some out)"


def test_a_run_is_scored_on_its_held_out_cases_else_on_all(tmp_path):
    records = [SimpleNamespace(case_id=c) for c in ("c1", "c2", "c3")]
    assert held_out_cases(records, None) == (records, False)
    assert held_out_cases(records, tmp_path) == (records, False)  # no split.json
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"]}))
    assert held_out_cases(records, tmp_path) == ([records[2]], True)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2", "c3"], "val": []}))
    assert held_out_cases(records, tmp_path) == (records, False)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1"], "val": ["gone"]}))  # deleted since
    assert held_out_cases(records, tmp_path) == (records, False)
    (tmp_path / "split.json").write_text("not json")
    assert held_out_cases(records, tmp_path) == (records, False)
