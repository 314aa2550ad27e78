"""The speculation cost model: formulas, inversion, tree choice, calibration, schedule."""

import jax
import numpy as np
import pytest

from specjax import cost_model, drafts, sequoia
from specjax.config import tiny_config
from specjax.params import init_params
from specjax.tree import TokenTree

chain = TokenTree.chain


def test_expected_tokens_formula():
  assert cost_model.expected_tokens(0.0, 4) == 1.0
  assert cost_model.expected_tokens(1.0, 4) == 5.0
  assert cost_model.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
  # The chain formula is the one-branch case of the tree model.
  assert 1 + sequoia.expected_accepted(chain(3), (0.6,)) == pytest.approx(
      cost_model.expected_tokens(0.6, 3))


@pytest.mark.parametrize("alpha, gamma", [(0.3, 2), (0.8, 4), (0.95, 6)])
def test_acceptance_inversion_round_trips(alpha, gamma):
  tokens = cost_model.expected_tokens(alpha, gamma)
  assert cost_model.acceptance_from_tokens(tokens, gamma) == pytest.approx(alpha, abs=1e-6)


def test_fit_first_rank_reproduces_measured_tokens_on_a_tree():
  tree = TokenTree((-1, 0, 0, 1, 1, 3))
  prior = (0.5, 0.3, 0.2)
  fitted = cost_model.fit_first_rank(tree, prior, 2.1)
  assert fitted[1:] == prior[1:]
  assert 1 + sequoia.expected_accepted(tree, fitted) == pytest.approx(2.1, abs=1e-9)


def _timings(draft_cost):
  # Verifying more tokens is nearly free (KV-bound regime); drafts cost draft_cost each.
  return cost_model.Timings(batch=8, context=8192,
                            target={1: 1.0, 3: 1.05, 5: 1.1, 9: 1.2},
                            draft={chain(2): draft_cost, chain(4): draft_cost,
                                   chain(8): draft_cost})


def test_choose_follows_draft_cost_and_acceptance():
  chains = [chain(2), chain(4), chain(8)]
  assert cost_model.choose(_timings(0.05), (0.9,), chains) == chain(8)  # cheap, accurate
  assert cost_model.choose(_timings(0.05), (0.5,), chains) == chain(2)  # cheap, inaccurate
  assert cost_model.choose(_timings(0.9), (0.9,), [chain(0)] + chains) == chain(0)
  assert cost_model.choose(_timings(0.9), (0.9,), chains) == chain(2)  # 0 not allowed
  t = _timings(0.2)
  assert t.predicted_speedup(chain(4), (0.8,)) == pytest.approx(
      cost_model.expected_tokens(0.8, 4) * 1.0 / (4 * 0.2 + 1.1))


def test_choose_prefers_a_tree_when_rank_one_pays():
  """Same nodes and verify cost: with a strong second rank the bushy tree wins."""
  bushy = sequoia.optimal_tree(5, 2, (0.5, 0.45))
  assert bushy.max_depth == 2 and bushy != chain(4)
  t = cost_model.Timings(batch=8, context=8192, target={1: 1.0, 5: 1.1},
                         draft={chain(4): 0.05, bushy: 0.05})
  assert cost_model.choose(t, (0.5, 0.45), [chain(4), bushy]) == bushy
  assert cost_model.choose(t, (0.95, 0.0), [chain(4), bushy]) == chain(4)


def test_calibrate_times_the_engine_forwards():
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(0))
  spec = drafts.SpecConfig(gamma=2, sinks=2, window=16)
  tree = TokenTree((-1, 0, 0, 1, 2))
  t = cost_model.calibrate(params, cfg, batch=2, context=100, trees=[chain(2), chain(3), tree],
                           spec_template=spec, repeats=1)
  assert set(t.target) == {1, 3, 4, 5} and set(t.draft) == {chain(2), chain(3), tree}
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
  t = cost_model.calibrate(params, cfg, batch=2, context=64, trees=[chain(1), chain(2)],
                           spec_template=spec, repeats=1, draft_params=draft_params)
  assert set(t.draft) == {chain(1), chain(2)} and all(v > 0 for v in t.draft.values())


class _Recorder:
  def __init__(self, timings):
    self.timings, self.asked = timings, []

  def __call__(self, context):
    self.asked.append(context)
    return self.timings


def test_schedule_measures_before_it_settles():
  timings = _Recorder(_timings(0.05))
  choices = [chain(0), chain(2), chain(4), chain(8)]
  schedule = cost_model.ShapeSchedule(timings, choices, prior=(0.9,))
  assert schedule.choose(4096) == chain(8) and timings.asked == [4096]
  # Measured: 1.5 tokens per round at gamma 8 -> alpha ~ 1/3: a short chain is better.
  schedule.observe(chain(8), tokens=30, row_rounds=20)
  assert schedule.accept[0] == pytest.approx(cost_model.acceptance_from_tokens(1.5, 8))
  assert schedule.choose(8192) == chain(2)
  schedule.observe(chain(0), tokens=10, row_rounds=10)  # plain decoding teaches nothing
  assert schedule.accept[0] == pytest.approx(cost_model.acceptance_from_tokens(1.5, 8))
  # A costly draft: plain decoding, but only once acceptance has been measured.
  costly = cost_model.ShapeSchedule(_Recorder(_timings(0.9)), choices[:3])
  assert costly.choose(1024) == chain(2)
  costly.observe(chain(2), tokens=25, row_rounds=10)
  assert costly.choose(1024) == chain(0)


def test_schedule_probes_shallow_then_goes_by_the_measured_acceptance():
  choices = [chain(0), chain(2), chain(4), chain(8)]
  schedule = cost_model.ShapeSchedule(_Recorder(_timings(0.05)), choices, prior=(0.9,),
                                      probe_depth=4)
  assert schedule.choose(4096) == chain(4)  # the prior would take chain(8)
  schedule.observe(chain(4), tokens=48, row_rounds=10)  # 4.8 of 5 tokens per round
  assert schedule.choose(4096) == chain(8)
  only_deep = cost_model.ShapeSchedule(_Recorder(_timings(0.05)), choices[2:],
                                       probe_depth=2)
  assert only_deep.choose(4096) == chain(4)  # the shallowest there is


def test_schedule_judges_the_trees_that_ran_by_the_tokens_they_gained():
  """The probe's rate makes the model expect over 8 tokens a round from chain(8); its
  rounds gain 4 (rejections come in runs): the schedule goes back to chain(4), whose
  measured rate is better, though the refit model alone would stay with chain(8)."""
  timings = _Recorder(_timings(0.05))
  choices = [chain(0), chain(2), chain(4), chain(8)]
  schedule = cost_model.ShapeSchedule(timings, choices, prior=(0.9,), probe_depth=4)
  t = timings.timings
  assert schedule.choose(4096) == chain(4)
  schedule.observe(chain(4), tokens=48, row_rounds=10, context=4096,
                   seconds=4 * t.round_time(chain(4)), rounds=4)
  assert schedule.tokens_per_round(4096, [chain(4)]) == [pytest.approx(4.8)]
  assert schedule.choose(4096) == chain(8)
  schedule.observe(chain(8), tokens=40, row_rounds=10, context=4096,
                   seconds=4 * t.round_time(chain(8)), rounds=4)
  measured = schedule.tokens_per_round(4096, choices)
  assert measured[0] == 1.0 and measured[2:] == [pytest.approx(4.8), pytest.approx(4.0)]
  accept = schedule.accept
  assert 1 + sequoia.expected_accepted(chain(8), accept) > 4.8  # the model alone: chain(8)
  assert schedule.choose(4096) == chain(4)
  # Another bucket has measured nothing: the model decides there.
  assert schedule.tokens_per_round(8192, [chain(8)]) == [
      pytest.approx(1 + sequoia.expected_accepted(chain(8), accept))]


def test_schedule_trusts_measured_round_times_over_calibration():
  """A calibration that overestimated the draft (e.g. timed on a busy machine) picks
  plain decoding; once the segment it ran reports its real round time, and a
  speculative probe its own, the schedule goes by the measurements."""
  inflated = _Recorder(_timings(0.9))
  choices = [chain(0), chain(2)]
  schedule = cost_model.ShapeSchedule(inflated, choices, prior=(0.9,))
  assert schedule.choose(2048) == chain(2)  # the probe
  t = inflated.timings
  # The probe really took a quarter of its calibrated time per round.
  schedule.observe(chain(2), tokens=27, row_rounds=10, context=2048,
                   seconds=10 * t.round_time(chain(2)) / 4, rounds=10)
  np.testing.assert_allclose(schedule.round_times(2048, choices),  # AR: not run yet
                             [t.round_time(chain(0)), t.round_time(chain(2)) / 4])
  np.testing.assert_allclose(schedule.round_times(4096, choices),  # another bucket
                             [t.round_time(chain(0)), t.round_time(chain(2))])
  assert schedule.choose(2048) == chain(2)
  calibrated_only = cost_model.ShapeSchedule(_Recorder(_timings(0.9)), choices, prior=(0.9,))
  calibrated_only.observe(chain(2), tokens=27, row_rounds=10)
  assert calibrated_only.choose(2048) == chain(0)


def test_schedule_rescales_the_drafting_of_trees_that_did_not_run():
  """The probe's measured round shows drafting at half its calibrated cost: the trees
  not run yet are predicted with their drafting halved, their verify unchanged."""
  timings = _Recorder(_timings(0.4))
  choices = [chain(0), chain(2), chain(4), chain(8)]
  schedule = cost_model.ShapeSchedule(timings, choices, prior=(0.9,))
  t = timings.timings
  assert schedule.draft_scale(2048) == 1.0
  half = t.target[9] + 0.5 * (t.round_time(chain(8)) - t.target[9])
  schedule.observe(chain(8), tokens=60, row_rounds=10, context=2048, seconds=10 * half,
                   rounds=10)
  assert schedule.draft_scale(2048) == pytest.approx(0.5)
  assert schedule.draft_scale(4096) == 1.0  # another bucket: its own calibration
  np.testing.assert_allclose(
      schedule.round_times(2048, choices),
      [t.target[1], t.target[3] + 0.5 * 2 * 0.4, t.target[5] + 0.5 * 4 * 0.4, half])


def test_schedule_averages_round_times_over_segments():
  """One slow segment of plain decoding (a host hiccup: 4 rounds at 3x their cost)
  does not hand the bucket to a chain whose measured rate is lower: round times are
  the mean over every segment of a (bucket, tree), not the last one alone."""
  timings = _Recorder(_timings(0.05))
  choices = [chain(0), chain(2)]
  schedule = cost_model.ShapeSchedule(timings, choices, prior=(0.9,))
  t = timings.timings
  ar = t.round_time(chain(0))
  chain_round = 2.5 * ar  # 1.5 tokens a round: 0.6 of plain decoding's rate
  schedule.observe(chain(2), tokens=15, row_rounds=10, context=1024,
                   seconds=10 * chain_round, rounds=10)
  for seconds in (4 * ar, 4 * ar, 4 * ar, 4 * 3 * ar):  # the last segment: a hiccup
    schedule.observe(chain(0), tokens=4, row_rounds=4, context=1024, seconds=seconds,
                     rounds=4)
  assert schedule.round_times(1024, choices) == [pytest.approx(1.5 * ar),
                                                 pytest.approx(chain_round)]
  assert schedule.choose(1024) == chain(0)  # by the last segment alone: chain(2)
