"""bench/traces.py: the trace recorder against the engine's own metrics on a tiny real run
(SD and SSD with a noisy-copy draft, so there are hits and misses), the exactness check,
and the summaries on a hand-made trace."""

import pytest

from bench import traces
from bench.datasets import Workload
from ssd_jax.engine.sampling import SamplingParams
from ssd_jax.llm import LLM

from engine_models import noisy_copy, scaled_target

PROMPTS = [[3, 17, 42, 8, 9], list(range(1, 30)), [77, 5], [11, 12, 13, 14, 15, 16, 17, 18]]
TARGET = scaled_target(seed=0)
DRAFT = noisy_copy(TARGET, 0.6)
COMMON = dict(page_size=16, max_model_len=128, max_batch_size=4)
_LLMS = {}


def _llm(method):
  """One engine per method for the whole module (building and compiling dominate)."""
  if method not in _LLMS:
    kw = {"ar": {}, "sd": dict(k=3), "ssd": dict(k=3, f=3, fallback="jit")}[method]
    _LLMS[method] = LLM(TARGET, None if method == "ar" else DRAFT, method=method, **kw,
                        **COMMON)
  return _LLMS[method]


def test_summary_by_hand():
  seqs = [{"count": [3, 1, 2], "accepted": [2, 0, 1], "hit": [-1, 1, 0]},
          {"count": [4], "accepted": [3], "hit": [1]}]
  rounds = [[(0, 0), (1, 1)], [(1, 1)], [(1, 0)]]
  s = traces.summarize(seqs, rounds)
  assert s["row_rounds"] == 4 and s["tokens"] == 10
  assert s["tokens_per_round"] == 2.5 and s["mean_accepted"] == 1.5
  assert s["hit_rate"] == pytest.approx(2 / 3)       # the -1 (no lookup) is not counted
  assert s["accepted_hist"] == [1, 1, 1, 1]
  assert s["accepted_after"] == {"hit": 1.5, "miss": 1.0}  # hit rounds: 0 and 3
  assert s["p_any_miss"] == pytest.approx(1 / 3)      # the third batch round missed
  assert traces.p_any_miss_at(0.9, 2) == pytest.approx(0.19)


@pytest.mark.parametrize("method", ["sd", "ssd"])
def test_recorder_agrees_with_engine_metrics(method):
  llm = _llm(method)
  rec = traces.TraceRecorder()
  llm.generate(PROMPTS, SamplingParams(max_new_tokens=20, ignore_eos=True), observer=rec)
  s = traces.summarize([rec.seq_trace(i) for i in sorted(rec.per_seq)], rec.batch_rounds)
  m = llm.last_metrics
  assert len(rec.per_seq) == len(PROMPTS)
  assert s["mean_accepted"] == pytest.approx(m["mean_accepted"])
  assert s["row_rounds"] == sum(len(t["count"]) for t in rec.per_seq.values())
  # every output token but the prefill's first comes from a traced round
  assert s["tokens"] == m["output_tokens"] - len(PROMPTS)
  if method == "ssd":
    assert s["hit_rate"] == pytest.approx(m["cache_hit_rate"])
    assert 0 < s["hit_rate"] < 1 and s["p_any_miss"] > 0  # both hits and misses happened


def test_run_config_checks_exactness():
  w = Workload("ids", PROMPTS[:2], False, {})
  # SD's output is AR's (tests/test_engine_exact.py), so one SD engine serves as both the
  # reference ("ar" here) and the checked run: the comparison logic is what is tested.
  make = lambda c: _llm("sd")
  ar_tokens = {}
  r_ar = traces.run_config({"method": "ar", "batches": [2]}, [w], [0.0], 12, make, ar_tokens,
                           warm="none", log=lambda *_: None)
  assert ("ids", 2) in ar_tokens and not r_ar["mismatches"]
  timing = r_ar["datasets"]["ids"]["0.0"]["2"]["timing"]
  assert timing["batch_rounds"] > 0 and timing["decode_tokens_per_s"] > 0
  r_sd = traces.run_config({"method": "sd", "k": 3, "batches": [2]}, [w], [0.0], 12, make,
                           ar_tokens, warm="none", log=lambda *_: None)
  assert r_sd["datasets"]["ids"]["0.0"]["2"]["exact_vs_ar"] is True
  ar_tokens[("ids", 2)][0] = [t + 1 for t in ar_tokens[("ids", 2)][0]]  # a corrupted reference
  r_bad = traces.run_config({"method": "sd", "k": 3, "batches": [2]}, [w], [0.0], 12, make,
                            ar_tokens, warm="none", log=lambda *_: None)
  assert r_bad["mismatches"][0]["prompt"] == 0 and r_bad["mismatches"][0]["first_diff"] == 0


def test_grid_and_names():
  g = traces.grid(["sd", "ssd"], [3], [1], [([2, 1, 1, 0], [1, 1, 1, 1])], ["jit"], [4, 1])
  names = [traces.config_name(c) for c in g]
  assert names == ["ar", "sd_k3", "ssd_k3_f1_jit", "ssd_k3_fan2-1-1-0_jit"]
  assert all(c["batches"] == [1, 4] for c in g)


def test_warm_waves_leaves_nothing_to_compile():
  """--warm=waves runs every timed wave once untimed first: the timed run compiles
  nothing, where warming with the first wave alone leaves later waves compiling (prompts
  of several lengths, one per wave, so the waves' shapes differ). Fresh engines: one that
  compiled these shapes earlier would show 0 either way."""
  w = Workload("ids", PROMPTS, False, {})
  c = {"method": "sd", "k": 3, "batches": [1]}
  fresh = lambda c: LLM(TARGET, DRAFT, method="sd", k=3, **COMMON)
  timed = lambda r: r["datasets"]["ids"]["0.0"]["1"]["timing"]["compilations"]
  first = traces.run_config(c, [w], [0.0], 12, fresh, {}, warm="first", log=lambda *_: None)
  assert timed(first) > 0
  waves = traces.run_config(c, [w], [0.0], 12, fresh, {}, warm="waves", log=lambda *_: None)
  assert timed(waves) == 0
  with pytest.raises(ValueError, match="warm="):
    traces.run_config(c, [w], [0.0], 12, fresh, {}, warm="yes", log=lambda *_: None)
