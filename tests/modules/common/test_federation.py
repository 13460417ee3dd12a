"""FederationConfig: the run config's keys, checks and defaults (the same as pyproject's [tool.flwr.app.config])."""

from __future__ import annotations

import pytest

from common.federation import ConfigError, FederationConfig


def test_run_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="run config unknown key 'alpah'"):
        FederationConfig.from_run_config({"alpah": 1.0})
    with pytest.raises(ConfigError, match="'k' must be int"):
        FederationConfig.from_run_config({"k": "three"})
    with pytest.raises(ConfigError, match="min-sharers"):
        FederationConfig.from_run_config({"k": 1})
    assert FederationConfig.from_run_config({"alpha": 1, "budget": 3.0}).search.alpha == 1.0
    with pytest.raises(ConfigError, match="alpha must be a finite number >= 0"):  # SearchConfig's own check
        FederationConfig.from_run_config({"alpha": -1})
    with pytest.raises(ConfigError, match="dp-noise needs dp-clip"):  # NodeConfig's
        FederationConfig.from_run_config({"dp-noise": 1.0})
    with pytest.raises(ConfigError, match="quirks exist for the tagging task only, not 'rating'"):  # the section's
        FederationConfig.from_run_config({"synth-quirks": True, "task": "rating"})
    with pytest.raises(ConfigError, match="synth-quirks applies to the synthetic tagging task only"):
        FederationConfig.from_run_config({"synth-quirks": True, "data-dir": "lamp"})
    assert FederationConfig.from_run_config({"synth-quirks": "true"}).synth.quirks is True
    with pytest.raises(ConfigError, match="privacy-metric must be one of task, agreement"):
        FederationConfig.from_run_config({"privacy-metric": "bleu"})
    with pytest.raises(ConfigError, match="merge must be one of exact, elementwise"):
        FederationConfig.from_run_config({"merge": "average"})
    chosen = FederationConfig.from_run_config({"privacy-metric": "agreement", "merge": "elementwise"})
    assert (chosen.search.privacy_metric, chosen.search.merge) == ("agreement", "elementwise")
    with pytest.raises(ConfigError, match="decoding 'median' needs ordered numeric labels"):
        FederationConfig.from_run_config({"decoding": "median"})  # the default task, tagging, has none
    with pytest.raises(ConfigError, match="tie-break 'expected' needs a label task"):
        FederationConfig.from_run_config({"task": "headline", "tie-break": "expected"})
    with pytest.raises(ConfigError, match="tie-break must be one of none, expected"):
        FederationConfig.from_run_config({"tie-break": "gold"})
    rating = FederationConfig.from_run_config({"task": "rating", "decoding": "expected", "tie-break": "expected"})
    assert (rating.search.decoding, rating.search.tie_break) == ("expected", "expected")


