"""Review 2026-12-06b: ``train --intensity RULE`` is normalised by ``format_intensity_rule`` (TrainConfig records the
normalised text and setup_run parses it again). ``{:g}`` kept six significant digits: a valid rule was refused
(``clip:1000000:1000001`` became ``clip:1e+06:1e+06``, "a_min must be < a_max") or silently changed
(``clip:0:1234567`` trained with 0 to 1234570, ``percentile:99.99995:100`` with 99.9999)."""
from __future__ import annotations

import pytest

from engine.preprocess import format_intensity_rule, parse_intensity_rule


@pytest.mark.parametrize("text", ["clip:1000000:1000001", "clip:0:1234567", "percentile:99.99995:100",
                                  "clip:-1024.25:3071.75", "clip:0.1:0.3", "clip:-1e+20:1e+20"])
def test_a_rule_survives_its_normalisation_unchanged(text):
    spec = parse_intensity_rule(text)
    assert parse_intensity_rule(format_intensity_rule(spec)) == spec


@pytest.mark.parametrize("spec, text", [({"mode": "clip", "a_min": -175.0, "a_max": 250.0}, "clip:-175:250"),
                                        ({"mode": "percentile", "lower": 0.5, "upper": 99.5}, "percentile:0.5:99.5"),
                                        ({"mode": "clip", "a_min": 0, "a_max": 1234567}, "clip:0:1234567")])
def test_the_written_form_stays_short(spec, text):
    assert format_intensity_rule(spec) == text


def test_train_config_keeps_what_was_typed():
    from engine.train.config import TrainConfig

    cfg = TrainConfig(dataset="d", out="o", intensity="clip:1000000:1000001")
    assert parse_intensity_rule(cfg.intensity) == {"mode": "clip", "a_min": 1000000.0, "a_max": 1000001.0}
