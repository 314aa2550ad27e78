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
  assert cost_model.choose_gamma(_timings(0.9), 0.9, [0, 2, 4, 8]) == 0  # draft ~ target
  assert cost_model.choose_gamma(_timings(0.9), 0.9, [2, 4, 8]) == 2  # 0 not allowed
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


@pytest.mark.parametrize("spec", [
    drafts.SpecConfig(gamma=2, draft_kv="snapkv", sinks=2, window=16, obs_window=4),
    drafts.SpecConfig(gamma=2, sinks=2, window=16, draft_cfg=tiny_config(num_layers=1)),
], ids=["snapkv", "draft_model"])
def test_calibrate_times_every_draft_kind(spec):
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(0))
  draft_params = None if spec.draft_cfg is None else init_params(spec.draft_cfg,
                                                                 jax.random.key(1))
  t = cost_model.calibrate(params, cfg, batch=2, context=64, gammas=[1, 2], spec_template=spec,
                           repeats=1, draft_params=draft_params)
  assert set(t.draft) == {1, 2} and all(v > 0 for v in t.draft.values())


class _Recorder:
  def __init__(self, timings):
    self.timings, self.asked = timings, []

  def __call__(self, context):
    self.asked.append(context)
    return self.timings


def test_gamma_schedule_measures_before_it_settles():
  timings = _Recorder(_timings(0.05))
  schedule = cost_model.GammaSchedule(timings, [0, 2, 4, 8], prior_alpha=0.9)
  assert schedule.choose(4096) == 8 and timings.asked == [4096]
  # Measured: 1.5 tokens per round at gamma 8 -> alpha ~ 1/3: a short chain is better.
  schedule.observe(8, tokens=30, row_rounds=20)
  assert schedule.alpha == pytest.approx(cost_model.acceptance_from_tokens(1.5, 8))
  assert schedule.choose(8192) == 2
  schedule.observe(0, tokens=10, row_rounds=10)  # autoregressive segments teach nothing
  assert schedule.alpha == pytest.approx(cost_model.acceptance_from_tokens(1.5, 8))
  # A costly draft: autoregressive, but only once acceptance has been measured.
  costly = cost_model.GammaSchedule(_Recorder(_timings(0.9)), [0, 2, 4])
  assert costly.choose(1024) == 2
  costly.observe(2, tokens=25, row_rounds=10)
  assert costly.choose(1024) == 0
