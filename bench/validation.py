r"""The speed-up model against every end-to-end figure already measured on H200s (issue 17,
point 4): each row is a measured round (bench/RESULTS.md or ../shared/FACTS.md, date and
section in `source`) beside what bench/speedup_model.py predicts for it from the
single-program step times, and the residual.

Random weights accept nothing by themselves, so the SD/SSD rounds below are the forced
regimes of bench/probes/ssd_timing.py: "all accepted" / "every lookup a hit" (K+1 = 8
tokens per round) and "every lookup a miss" (1 token per round). The model is given that
acceptance and predicts the time; tokens/s = tokens per round / round time.

Caveat stated per row: most SD/SSD rounds were measured on 2026-11-23, before the
2026-12-02 changes (8-row padding, kernels) that the step times of h200_step_times.json
come from; one row pairs same-day older step programs with a same-day SD round instead.
bench/gpu/headline.sh measures both sides in one call, which is the clean check.

The real pair end to end (`real_pair_rows`): every AR / SD / SSD run of a bench/traces.py
index on one GPU (target and draft on the same GPU, so the SSD round is verify + build, not
their max) against the model fed with that run's own acceptance, hit rate and P(some row
missed) and with the real pair's single-program step times (step_grid.py on the
smollm2-135m / smollm2-135m-l6 shapes): the check of the model where the acceptance is real.

  PYTHONPATH=$PWD python bench/validation.py --output_json /tmp/measured.json
  PYTHONPATH=$PWD python bench/validation.py \
      --real_pair_traces bench/results/2026-12-04/headline_s15/traces_t0 \
      --real_pair_steps bench/results/2026-12-04/real_pair_steps/steps_real_pair.json
"""

from __future__ import annotations

import json
import os
import sys

from bench import speedup_model as sm

STEP_TIMES = "bench/results/2026-12-02/h200_step_times.json"


def _shapes(path=STEP_TIMES):
  shapes = sm.load_shapes(path)
  # The 40-layer 70B-shape target measured on GPU 0 of two (RESULTS.md): one step 16.50 ms
  # (its own anchor; a verification of 8 tokens taken equal to it, as for the 8B).
  layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
  p40 = 40 * layer + 128256 * 8192
  shapes["llama-3.1-70b-40l"] = sm.ModelShape(
      name="llama-3.1-70b-40l", params=p40, bytes=2.0 * p40, layers=40, hidden=8192,
      anchors={"target_ar_step": {"q": 1, "ms": 16.50}, "target_verify": {"q": 8, "ms": 16.50}})
  # The same day's older single programs (FACTS.md 2026-12-02, before 8-row padding)
  shapes["llama-3.1-8b-old"] = sm.ModelShape(
      name="llama-3.1-8b-old", params=7.5e9, bytes=15.0e9, layers=32, hidden=4096,
      anchors={"target_ar_step": {"q": 1, "ms": 5.46}, "target_verify": {"q": 8, "ms": 4.54}})
  shapes["llama-3.2-1b-old"] = sm.ModelShape(
      name="llama-3.2-1b-old", params=1.236e9, bytes=2.47e9, layers=16, hidden=2048,
      anchors={"draft_step": {"q": 1, "ms": 1.59}, "draft_glue": {"q": 8, "ms": 1.59},
               "draft_tree_step": {"q": 24, "ms": 1.24}})
  return shapes


# (label, target, draft, gpus, batch, method, fallback, tokens/round, measured round ms,
#  split, source)
CASES = [
    ("8B AR", "llama-3.1-8b", None, "1", 1, "ar", None, 1, 4.74, True,
     "RESULTS.md 'Fixed cost per program' 2026-12-02, LLM.generate rows8_steps1: same code as the step times"),
    ("8B AR b8", "llama-3.1-8b", None, "1", 8, "ar", None, 1, 4.78, True,
     "RESULTS.md 'Fixed cost per program' 2026-12-02, batch 8 round (rows1_steps1 variant)"),
    ("1B AR", "llama-3.2-1b", None, "1", 1, "ar", None, 1, 1.24, True,
     "RESULTS.md 'Fixed cost per program' 2026-12-02, Llama-3.2-1B shape rows8_steps1 (the draft step program)"),
    ("8B/1B SD all accepted, one GPU", "llama-3.1-8b", "llama-3.2-1b", "1", 1, "sd", None, 8,
     12.87, True, "RESULTS.md 'Fifth to eighth calls' 2026-11-23 (older code than the step times)"),
    ("8B/1B SD, one GPU, same-day old step programs", "llama-3.1-8b-old", "llama-3.2-1b-old", "1",
     1, "sd", None, 8, 12.8, True,
     "FACTS.md 2026-12-02: SD round 12.8 ms and single programs 4.54/1.59 ms from the same code"),
    ("8B/1B SSD every lookup a hit, 1+1", "llama-3.1-8b", "llama-3.2-1b", "1+1", 1, "ssd_hit",
     "jit", 8, 9.88, True, "RESULTS.md 'Fifth to eighth calls' 2026-11-23, one loop of 0 or K trips"),
    ("8B/1B SSD every lookup a miss, jit, 1+1", "llama-3.1-8b", "llama-3.2-1b", "1+1", 1,
     "ssd_miss", "jit", 1, 17.48, True, "RESULTS.md 'Fifth to eighth calls' 2026-11-23"),
    ("8B/1B SSD every lookup a miss, fast, 1+1", "llama-3.1-8b", "llama-3.2-1b", "1+1", 1,
     "ssd_miss", "fast", 1, 8.99, True, "RESULTS.md 'Fifth to eighth calls' 2026-11-23 (call 5)"),
    ("70B-40-layer/1B SD all accepted", "llama-3.1-70b-40l", "llama-3.2-1b", "1", 1, "sd",
     None, 8, 25.59, True, "RESULTS.md 'Re-run with the final code' 2026-11-23"),
    ("70B-40-layer/1B SSD every lookup a hit, 1+1", "llama-3.1-70b-40l", "llama-3.2-1b", "1+1",
     1, "ssd_hit", "jit", 8, 17.57, True, "RESULTS.md 'Re-run with the final code' 2026-11-23"),
    ("8B AR, 2026-12-04", "llama-3.1-8b", None, "1", 1, "ar", None, 1, 4.205, True,
     "results/2026-12-04/headline_s15/rounds.log (ssd_timing.py --draft_devices 0)"),
    ("8B/1B SD all accepted, one GPU, 2026-12-04", "llama-3.1-8b", "llama-3.2-1b", "1", 1, "sd",
     None, 8, 10.331, True, "results/2026-12-04/headline_s15/rounds.log"),
    ("8B/1B SSD every lookup a hit, one GPU, 2026-12-04", "llama-3.1-8b", "llama-3.2-1b", "1", 1,
     "ssd_hit", "jit", 8, 13.865, False,
     "results/2026-12-04/headline_s15/rounds.log: draft on the target's GPU, nothing overlaps"),
]


def rows(shapes=None) -> list[dict]:
  shapes = shapes or _shapes()
  out = []
  for (label, tn, dn, gpus, b, meth, fb, tpr, ms, split, src) in CASES:
    t, d = shapes[tn], shapes[dn] if dn else None
    if meth == "ar" and tn.startswith("llama-3.2-1b"):
      pred_ms = sm.step_ms(t, "draft_step", b, 1)
    elif meth in ("ar", "sd"):
      pred_ms = sm.round_ms(meth, t, d, b, k=7)["round_ms"]
    else:
      p_miss = 0.0 if meth == "ssd_hit" else 1.0
      pred_ms = sm.round_ms("ssd", t, d, b, k=7, m=24, fallback=fb, p_miss=p_miss,
                            split=split)["round_ms"]
    tok = 1e3 * b * tpr / ms
    pred = 1e3 * b * tpr / pred_ms
    pair = "8B/1B" if tn == "llama-3.1-8b" else None  # the plot's panel (headline_report)
    out.append({"label": label, "pair": pair, "target": tn, "draft": dn, "gpus": gpus, "batch": b,
                "method": meth, "k": 7 if dn else None, "f": 3 if meth.startswith("ssd") else None,
                "fallback": fb, "tok_s": round(tok, 1), "predicted_tok_s": round(pred, 1),
                "round_ms": ms, "predicted_round_ms": round(pred_ms, 3),
                "residual": round(pred / tok - 1, 4), "kind": "measured",
                "acceptance": f"forced: {tpr} tokens per round" if dn else "AR",
                "source": src})
  return out


def real_pair_rows(index_path: str, steps_path: str, temperature: float = 0.0) -> list[dict]:
  """One row per (config, prompt set, batch) of a traces.py index: its measured decode
  tokens/s beside the model's prediction from the same run's statistics."""
  with open(index_path) as fh:
    index = json.load(fh)
  shapes = sm.load_shapes(steps_path)
  t, d = shapes["smollm2-135m"], shapes["smollm2-135m-l6"]
  out = []
  for entry in index["configs"]:
    c = entry["config"]
    meth, k = c["method"], c.get("k", 7)
    f = c.get("f", 3)
    for ds, per_t in entry["summary"].items():
      for b, s in per_t.get(str(float(temperature)), {}).items():
        b = int(b)
        if not s.get("decode_s") or not s["row_rounds"]:
          continue
        if meth == "ar":  # the model's AR round is one step; one token per row
          pred = 1e3 * b / sm.step_ms(t, "target_ar_step", b, 1)
        else:
          st = sm.Stats(tokens_per_round=s["tokens_per_round"], hit_rate=s.get("hit_rate"),
                        p_any_miss={str(b): s["p_any_miss"]} if s.get("p_any_miss") is not None
                        else None)
          pred = sm.predict(meth, t, d, b, st, k=k, m=(k + 1) * f, fallback=c.get("fallback"),
                            split=False, tokens_per_batch_round=s["tokens"] / s["batch_rounds"]
                            )["tok_s"]
        tok = s["decode_tokens_per_s"]
        label = meth if meth == "ar" else (f"sd K={k}" if meth == "sd" else
                                           f"ssd K={k} F={f} {c.get('fallback')}")
        out.append({"label": f"real pair {label}, {ds}", "pair": None, "target": "smollm2-135m",
                    "draft": None if meth == "ar" else "smollm2-135m-draft", "gpus": "1",
                    "batch": b, "method": meth, "k": None if meth == "ar" else k,
                    "f": f if meth == "ssd" else None, "fallback": c.get("fallback"),
                    "tok_s": round(tok, 1), "predicted_tok_s": round(pred, 1),
                    "residual": round(pred / tok - 1, 4), "kind": "measured",
                    "acceptance": f"real: {s['tokens_per_round']:.2f} tokens per row-round",
                    "source": f"{index_path} (bench/traces.py, one H200, bf16, T={temperature}); "
                              f"step times {steps_path}"})
  return out


def real_pair_markdown(rs) -> str:
  lines = ["| real pair run | batch | tok/s measured | predicted | residual |",
           "| --- | --- | --- | --- | --- |"]
  for r in rs:
    lines.append(f"| {r['label']} | {r['batch']} | {r['tok_s']:.0f} | "
                 f"{r['predicted_tok_s']:.0f} | {100 * r['residual']:+.1f}% |")
  return "\n".join(lines) + "\n"


def markdown(rs) -> str:
  lines = ["| measured round | GPUs | measured ms | predicted ms | tok/s measured | predicted | "
           "residual |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rs:
    lines.append(f"| {r['label']} | {r['gpus']} | {r['round_ms']:.2f} | "
                 f"{r['predicted_round_ms']:.2f} | {r['tok_s']:.0f} | {r['predicted_tok_s']:.0f} | "
                 f"{100 * r['residual']:+.1f}% |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from absl import app, flags
  flags.DEFINE_string("output_json", None, "Write the rows here.")
  flags.DEFINE_string("real_pair_traces", None, "A traces.py output dir (index.json): "
                      "validate on the real pair's runs instead of the forced rounds.")
  flags.DEFINE_string("real_pair_steps", None, "step_grid.py JSON of smollm2-135m and "
                      "smollm2-135m-l6 (with --real_pair_traces).")

  def _main(argv):
    del argv
    F = flags.FLAGS
    if F.real_pair_traces:
      if not F.real_pair_steps:
        raise app.UsageError("--real_pair_traces needs --real_pair_steps")
      rs = real_pair_rows(os.path.join(F.real_pair_traces, "index.json"), F.real_pair_steps)
      print(real_pair_markdown(rs))
    else:
      rs = rows()
      print(markdown(rs))
    if flags.FLAGS.output_json:
      with open(flags.FLAGS.output_json, "w") as fh:
        json.dump(rs, fh, indent=1)
  app.run(_main)
