"""bench/speedup_model.py on fixed step times and trace statistics: every figure below is
computed by hand from the formulas of the module docstring (no JAX, instant)."""

import math

import pytest

from bench import speedup_model as sm


def _shape(name, **measured):
  """A model whose programs are measured at batch 1 and 2 (no extrapolation)."""
  m = {}
  for key, ms in measured.items():
    prog, b, q = key.split("__")
    m[f"{prog}|{b}|{q}"] = ms
  return sm.ModelShape(name=name, params=1e9, bytes=1e9, layers=1, hidden=8, measured=m)


T = _shape("t", target_ar_step__1__1=5.0, target_ar_step__4__1=10.0,
           target_verify__1__4=10.0, target_verify__2__4=10.0)
D = _shape("d", draft_step__1__1=1.0, draft_step__2__1=1.0, draft_glue__1__4=1.0,
           draft_glue__2__4=1.0, draft_tree_step__1__8=2.0, draft_tree_step__2__8=2.0)


def test_ar():
  assert sm.predict("ar", T, None, 4)["tok_s"] == pytest.approx(4 * 1000 / 10.0)  # 400


def test_sd():
  p = sm.predict("sd", T, D, 1, sm.Stats(tokens_per_round=2.5), k=3)
  assert p["round_ms"] == pytest.approx(10.0 + 3 * 1.0)        # verify + K draft steps
  assert p["tok_s"] == pytest.approx(2.5 * 1000 / 13.0)        # 192.3


def test_ssd_split_jit_and_fast():
  st = sm.Stats(tokens_per_round=2.5, hit_rate=0.8)
  hit = 0.2 + max(10.0 + 2 * 0.09, 1.0 + 3 * 2.0)             # lookup + max(verify+xfers, build)
  jit = sm.predict("ssd", T, D, 2, st, k=3, m=8, fallback="jit")
  p_miss = 1 - 0.8 ** 2                                        # some row of 2 missed: 0.36
  assert jit["p_any_miss"] == pytest.approx(p_miss)
  assert jit["round_ms"] == pytest.approx(hit + p_miss * 3 * 1.0)   # 10.38 + 1.08
  assert jit["tok_s"] == pytest.approx(2 * 2.5 * 1000 / (hit + 1.08))
  fast = sm.predict("ssd", T, D, 2, st, k=3, m=8, fallback="fast")
  assert fast["round_ms"] == pytest.approx(hit)
  assert fast["draft_hidden"]


def test_ssd_measured_any_miss_and_shared_gpu():
  st = sm.Stats(tokens_per_round=2.0, hit_rate=0.8, p_any_miss={"2": 0.25})
  assert st.any_miss(2) == 0.25 and st.any_miss(1) == pytest.approx(0.2)
  shared = sm.predict("ssd", T, D, 1, st, k=3, m=8, fallback="fast", split=False)
  assert shared["round_ms"] == pytest.approx(0.2 + 10.0 + 1.0 + 6.0)   # nothing overlaps


def test_roofline_extrapolation_from_anchor():
  """A3: c0 = anchor - max(bytes/BW, flops/FLOPS); at 550 tokens the GEMMs take 2 ms."""
  s = sm.ModelShape(name="x", params=1e9, bytes=sm.READ_BW * 1e-3, layers=1, hidden=8,
                    anchors={"target_ar_step": {"q": 1, "ms": 5.0}})
  assert sm.step_ms(s, "target_ar_step", 1, 1) == pytest.approx(5.0)
  n = 550
  flops_ms = 1e3 * 2 * 1e9 * n / sm.FLOPS                    # 2.0 ms
  assert sm.step_ms(s, "target_ar_step", 55, 10) == pytest.approx(4.0 + flops_ms)
  assert sm.step_ms(s, "target_ar_step", 4, 1) == pytest.approx(5.0)  # still weight-bound


def test_allreduce_bound():
  s = sm.ModelShape(name="tp", params=1e9, bytes=sm.READ_BW * 1e-3, layers=1, hidden=1000,
                    allreduces=10, anchors={"target_ar_step": {"q": 1, "ms": 5.0}})
  # 10 x (20 us + 2 bytes x 1000 x n / 300 GB/s); the anchor already holds n = 1
  per = lambda n: 10 * (0.020 + 1e3 * 2 * 1000 * n / 300e9)
  assert sm.allreduce_ms(s, 3) == pytest.approx(per(3))
  assert sm.step_ms(s, "target_ar_step", 3, 1) == pytest.approx(5.0 - per(1) + per(3))


def test_iid_acceptance():
  assert sm.tokens_per_round_iid(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
  assert sm.tokens_per_round_iid(1.0, 7) == 8.0
  assert sm.alpha_from_tokens(1.875, 3) == pytest.approx(0.5, abs=1e-9)
  rows = sm.ratio_table([0.0, 0.5], 3, 1.0, T, D, 1, m=8)
  assert rows[0]["sd"] == pytest.approx(1000 / 13.0)
  assert math.isclose(rows[1]["tokens_per_round"], 1.875)


def test_best_picks_the_fastest():
  stats = {(3, 1, 8, "jit"): sm.Stats(2.0, 0.5), (3, 1, 8, "fast"): sm.Stats(2.0, 0.5)}
  best = sm.best_ssd(T, D, 2, stats)
  assert best["fallback"] == "fast"  # same tokens, fast never pays the K draft steps


def test_tp_shard_measured_without_allreduce():
  """A shard timed alone on one GPU (step_grid.py) lacks its all-reduces: the model adds
  them to the measurement and to extrapolations from its anchor alike."""
  s = sm.ModelShape(name="tp", params=1e9, bytes=sm.READ_BW * 1e-3, layers=1, hidden=1000,
                    allreduces=10, measured_has_allreduce=False,
                    anchors={"target_ar_step": {"q": 1, "ms": 5.0}},
                    measured={"target_ar_step|1|1": 5.0})
  assert sm.step_ms(s, "target_ar_step", 1, 1) == pytest.approx(5.0 + sm.allreduce_ms(s, 1))
  assert sm.step_ms(s, "target_ar_step", 2, 1) == pytest.approx(5.0 + sm.allreduce_ms(s, 2))


def test_report_truncation_and_stats(tmp_path):
  """headline_report: a K=7 histogram truncated to K=3, and an index.json read back."""
  import json
  from bench import headline_report as hr
  hist = [2, 1, 0, 0, 1, 0, 0, 1]             # accepted 0,0,1,4,7
  assert hr.truncated(hist, 3) == pytest.approx(1 + (0 + 0 + 1 + 3 + 3) / 5)
  s = {"row_rounds": 5, "tokens": 17, "accepted_hist": hist, "lookups": 4, "hit_rate": 0.5,
       "p_any_miss": 0.5, "batch_rounds": 4, "decode_s": 1.0}
  index = {"configs": [{"name": "ssd_k7_f3_jit", "config": {"method": "ssd", "k": 7, "f": 3,
                                                             "fallback": "jit", "batches": [1]},
                        "summary": {"prose": {"0.0": {"1": s}}}}]}
  (tmp_path / "index.json").write_text(json.dumps(index))
  raw = hr.load_stats([str(tmp_path)])
  st = raw[("ssd", 7, 3, 24, "jit")]["stats"]
  assert st.tokens_per_round == pytest.approx(17 / 5) and st.hit_rate == 0.5
  assert st.any_miss(1) == 0.5
  _, ssd = hr.stats_grid(raw)
  assert ssd[(3, 3, 12, "jit")].tokens_per_round == pytest.approx(hr.truncated(hist, 3))


def test_real_pair_validation_rows(tmp_path):
  """validation.real_pair_rows: a traced run's measured tokens/s beside the model fed with
  that run's own statistics, target and draft sharing one GPU (hand-computed)."""
  import json
  from bench import validation
  shape = lambda name, measured: {"params": 1e8, "bytes": 2e8, "layers": 1,  # noqa: E731
                                  "hidden": 8, "measured": measured}
  steps = {"models": {
      "smollm2-135m": shape("t", {"target_ar_step|2|1": 1.0, "target_verify|2|4": 2.0}),
      "smollm2-135m-l6": shape("d", {"draft_step|2|1": 0.5, "draft_glue|2|4": 0.5,
                                     "draft_tree_step|2|12": 1.0})}}
  run = lambda tok, tpr, **kw: {"2": {  # noqa: E731
      "row_rounds": 10, "tokens": tok, "tokens_per_round": tpr, "batch_rounds": 5,
      "decode_s": 0.01, "decode_tokens_per_s": 1000.0, **kw}}
  index = {"configs": [
      {"name": "ar", "config": {"method": "ar"}, "summary": {"s": {"0.0": run(10, 1.0)}}},
      {"name": "sd_k3", "config": {"method": "sd", "k": 3},
       "summary": {"s": {"0.0": run(25, 2.5)}}},
      {"name": "ssd", "config": {"method": "ssd", "k": 3, "f": 3, "fallback": "jit"},
       "summary": {"s": {"0.0": run(25, 2.5, hit_rate=0.8, p_any_miss=0.5)}}}]}
  (tmp_path / "index.json").write_text(json.dumps(index))
  (tmp_path / "steps.json").write_text(json.dumps(steps))
  rows = validation.real_pair_rows(str(tmp_path / "index.json"), str(tmp_path / "steps.json"))
  pred = {r["method"]: r["predicted_tok_s"] for r in rows}
  assert pred["ar"] == pytest.approx(2 * 1000 / 1.0, rel=1e-3)
  assert pred["sd"] == pytest.approx(5 * 1000 / (2.0 + 3 * 0.5), rel=1e-3)  # 5 tokens a batch round
  # one GPU: lookup + verify + build (glue + K tree steps), + P(some row missed) K steps
  ssd_ms = 0.2 + 2.0 + (0.5 + 3 * 1.0) + 0.5 * 3 * 0.5
  assert pred["ssd"] == pytest.approx(5 * 1000 / ssd_ms, rel=1e-3)
  assert all(r["tok_s"] == 1000.0 and r["kind"] == "measured" for r in rows)
  assert rows[0]["residual"] == pytest.approx(1.0, rel=1e-3)


def test_step_grid_cuts_a_shape_to_its_first_layers():
  from bench.probes.step_grid import shard_config
  cfg, tp = shard_config("smollm2-135m-l6")
  assert cfg.num_layers == 6 and tp == 1 and cfg.hidden_size == 576
  cfg, tp = shard_config("llama-3.1-70b-tp4")
  assert tp == 4 and cfg.num_heads == 16
