"""The benchmark report: rows built from the engine's per-call metrics, the exactness
comparison, and the text table. Shared by the harness (which writes reports) and plot.py
(which reads them); it imports neither."""

from __future__ import annotations

import math

SCHEMA = "ssd_jax.bench/1"
RANDOM_LABEL = "random-weight timing"


def num(x):
  """x as a float if it is a finite number (not a bool), else None."""
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) \
      and math.isfinite(float(x)) else None


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def profile_times(m: dict) -> tuple[dict, dict]:
  """(round times, phase times), ms, from one generate() call's `last_metrics`. In profile
  mode the engine adds medians of whole rounds (`profiled_round_ms`, `hit_round_ms`,
  `miss_round_ms`) and of each timed part of a round (`<phase>_ms`, e.g. SD's `propose_ms`
  and `verify_ms`) to its plain metrics, whose only other `*_ms` key is `round_ms`."""
  rounds, phases = {}, {}
  for key, v in m.items():
    if key == "round_ms" or not key.endswith("_ms") or num(v) is None:
      continue
    (rounds if key.endswith("round_ms") else phases)[key] = float(v)
  return rounds, phases


def _call_decode_s(c: dict) -> float:
  """Decode time (prefill excluded) of one generate() call from the engine's metrics."""
  m = c["m"]
  rounds, rms = num(m.get("num_rounds")), num(m.get("round_ms"))
  if rounds and rms:
    return rounds * rms / 1e3
  dtps = num(m.get("decode_tokens_per_s"))
  if dtps:
    return max(c["output_tokens"] - c["n"], 0) / dtps
  return c["wall_s"]


def aggregate(calls: list[dict], batch_size: int) -> dict:
  """Combine the metrics of several generate() calls into one row. Each call is
  {"m": last_metrics, "wall_s", "n": prompts, "output_tokens"}.

  tokens_per_s: output tokens over the generate() wall time (the engine's definition;
  prefill included). decode_tokens_per_s: tokens after each sequence's first over the
  decode time (rounds x round time). round_ms: decode time per round of the batch.
  Profiled times are round-weighted means of the calls' medians.
  """
  out_tokens = sum(c["output_tokens"] for c in calls)
  n_seqs = sum(c["n"] for c in calls)
  wall_s = sum(num(c["m"].get("wall_s")) or c["wall_s"] for c in calls)
  decode_s = sum(_call_decode_s(c) for c in calls)
  rounds = sum(int(num(c["m"].get("num_rounds")) or 0) for c in calls)

  def weighted(values):
    """values: [(value or None, call)] -> mean weighted by each call's rounds."""
    acc = den = 0.0
    for v, c in values:
      w = num(c["m"].get("num_rounds")) or 1.0
      if v is not None:
        acc += v * w
        den += w
    return acc / den if den else None

  def weighted_key(key):
    return weighted([(num(c["m"].get(key)), c) for c in calls])

  per_call = [(profile_times(c["m"]), c) for c in calls]
  profiled = {k: weighted([(t[0].get(k), c) for t, c in per_call])
              for k in sorted({k for t, _ in per_call for k in t[0]})}
  phases = {k: weighted([(t[1].get(k), c) for t, c in per_call])
            for k in sorted({k for t, _ in per_call for k in t[1]})}
  ttfts = [(num(c["m"].get("ttft_s")), c["n"]) for c in calls]
  ttfts = [(t, n) for t, n in ttfts if t is not None]
  comps = [num(c["m"].get("compilations")) for c in calls]
  return {
      "batch_size": batch_size,
      "n_prompts": n_seqs,
      "n_calls": len(calls),
      "output_tokens": out_tokens,
      "wall_s": wall_s,
      "bench_wall_s": sum(c["wall_s"] for c in calls),
      "decode_s": decode_s,
      "tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
      "decode_tokens_per_s": (out_tokens - n_seqs) / decode_s if decode_s > 0 else None,
      "ttft_s": (sum(t * n for t, n in ttfts) / sum(n for _, n in ttfts)) if ttfts else None,
      "num_rounds": rounds,
      "round_ms": 1e3 * decode_s / rounds if rounds else None,
      "mean_accepted": weighted_key("mean_accepted"),
      "cache_hit_rate": weighted_key("cache_hit_rate"),
      "compilations": int(sum(c for c in comps if c is not None)) if any(
          c is not None for c in comps) else None,
      "time_split_per_round_ms": phases or None,
      "profiled": profiled or None,
  }


def first_mismatch(a: list, b: list) -> int | None:
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def bandwidth_line(report: dict) -> str | None:
  """The ceilings a report's roofline used, labelled."""
  rf = report.get("roofline") or {}
  bw = rf.get("bandwidth") or {}
  if not bw.get("bandwidth_Bps"):
    return None
  kind = bw.get("kind", "copy")  # reports written before the read ceiling used a copy
  line = f"{kind} ceiling {bw['bandwidth_Bps'] / 1e9:.0f} GB/s"
  copy = (rf.get("copy_bandwidth") or {}).get("bandwidth_Bps")
  if copy:
    line += f" (copy, read + written: {copy / 1e9:.0f} GB/s, not used)"
  return line + "; roofline = floor ms / round ms (fewest bytes per round over that ceiling)"


def format_table(report: dict) -> str:
  rows = report.get("results", [])
  label = report.get("label") or ""
  head = (f"{'method':<8}{'dataset':<13}{'bs':>3}{'tok/s':>9}{'dec tok/s':>10}{'speedup':>9}"
          f"{'TTFT ms':>9}"
          f"{'accept':>8}{'hit':>6}{'round ms':>10}{'floor ms':>10}{'roofline':>9}"
          f"{'compiles':>9}  exact")
  lines = []
  if label:
    lines.append(f"== {label.upper()} ==")
  bw = bandwidth_line(report)
  if bw:
    lines.append(bw)
  lines.append(head)
  for r in rows:
    rf = r.get("roofline") or {}
    ex = r.get("exact_vs_ar")
    exact = "-" if ex is None else ("ok" if ex["mismatches"] == 0 else
                                    f"FAIL {ex['mismatches']}/{ex['checked']}")
    sp = r.get("speedup_over_ar")
    sp_s = ("n/a*" if report.get("random_weights") and r["method"] != "ar"
            else fmt(sp, ".2f") + ("x" if sp is not None else ""))
    lines.append(
        f"{r['method']:<8}{r['dataset'][:12]:<13}{r['batch_size']:>3}"
        f"{fmt(r.get('tokens_per_s'), '.1f'):>9}{fmt(r.get('decode_tokens_per_s'), '.1f'):>10}"
        f"{sp_s:>9}"
        f"{fmt(None if r.get('ttft_s') is None else 1e3 * r['ttft_s'], '.1f'):>9}"
        f"{fmt(r.get('mean_accepted'), '.2f'):>8}{fmt(r.get('cache_hit_rate'), '.2f'):>6}"
        f"{fmt(r.get('round_ms'), '.2f'):>10}{fmt(rf.get('round_floor_ms'), '.2f'):>10}"
        f"{fmt(rf.get('achieved_fraction'), '.2f'):>9}"
        f"{fmt(r.get('compilations'), 'd') if r.get('compilations') is not None else '-':>9}"
        f"  {exact}")
    for name, d in (("split/round", r.get("time_split_per_round_ms")),
                    ("profiled", r.get("profiled"))):
      d = {k: v for k, v in (d or {}).items() if v is not None}
      if d:
        lines.append(f"        {name}: " + "  ".join(f"{k} {v:.2f}" for k, v in d.items()))
  if report.get("random_weights"):
    lines.append("* random-weight timing: acceptance/hit rates are meaningless; "
                 "no speed-up is claimed")
  if report.get("exactness"):
    lines.append(f"exactness vs AR: {report['exactness']}")
  for e in report.get("errors") or []:
    lines.append(f"!!! {e['method']} FAILED: {e['error'][:300]}")
  return "\n".join(lines)
