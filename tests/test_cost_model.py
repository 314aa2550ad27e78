"""The speculation cost model: formulas, inversion, gamma choice, calibration."""

import jax
import pytest

from specjax import cost_model, drafts
from specjax.config import tiny_config
from specjax.params import init_params


def test_expected_tokens_formula():
  assert cost_model.expected_tokens(0.0, 4) == 1.0
  assert cost_model.expected_tokens(1.0, 4) == 5.0
  assert cost_model.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("alpha, gamma", [(0.3, 2), (0.8, 4), (0.95, 6)])
def test_acceptance_inversion_round_trips(alpha, gamma):
  tokens = cost_model.expected_tokens(alpha, gamma)
  assert cost_model.acceptance_from_tokens(tokens, gamma) == pytest.approx(alpha, abs=1e-6)


def _timings(draft_cost):
  # Verifying more tokens is nearly free (KV-bound regime); drafts cost draft_cost each.
  return cost_model.Timings(batch=8, context=8192,
                            target={1: 1.0, 3: 1.05, 5: 1.1, 9: 1.2},
                            draft={2: draft_cost, 4: draft_cost, 8: draft_cost})


def test_choose_gamma_follows_draft_cost_and_acceptance():
  assert cost_model.choose_gamma(_timings(0.05), 0.9, [2, 4, 8]) == 8  # cheap, accurate
  assert cost_model.choose_gamma(_timings(0.05), 0.5, [2, 4, 8]) == 2  # cheap, inaccurate
  assert cost_model.choose_gamma(_timings(0.9), 0.9, [2, 4, 8]) == 0  # draft ~ target
  t = _timings(0.2)
  assert t.predicted_speedup(0.8, 4) == pytest.approx(
      cost_model.expected_tokens(0.8, 4) * 1.0 / (4 * 0.2 + 1.1))


def test_calibrate_times_the_engine_forwards():
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(0))
  spec = drafts.SpecConfig(gamma=2, sinks=2, window=16)
  t = cost_model.calibrate(params, cfg, batch=2, context=100, gammas=[2, 3], spec_template=spec,
                           repeats=1)
  assert set(t.target) == {1, 3, 4} and set(t.draft) == {2, 3}
  assert all(v > 0 for v in list(t.target.values()) + list(t.draft.values()))
