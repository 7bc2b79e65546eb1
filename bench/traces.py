r"""Per-round acceptance / cache-hit traces of the real pair, for the speed-up model (issue 17).

Why traces and not just the engine's means: the speed-up model (bench/speedup_model.py)
needs, per configuration, the tokens a round commits and how often a round pays SSD's
fallback. With the `jit` fallback the whole batch waits for K draft steps when *any* row
missed (ssd.py: one loop of 0 or K trips), so the per-row hit rate alone is not enough at
batch > 1: the model needs the fraction of batch rounds with at least one miss, which only a
per-round, per-row record gives (and lets the model re-batch rows it was not run with).

`TraceRecorder` is a RoundObserver (ssd_jax/engine/observe.py): the host loop calls
`round_read(rows, count, info)` once per round when it reads that round. It counts a row
exactly when the loop's `_drain` does (a live row with count > 0), so its means equal the
engine's `last_metrics["mean_accepted"]` and `["cache_hit_rate"]` (tests/test_traces.py).

The CLI runs a grid over the embedded default pair (SmolLM2-135M-Instruct + the bundled
6-layer draft; `LLM(method=...)` with no model) unless --model/--draft are given:

  PYTHONPATH=$PWD python bench/traces.py --datasets humaneval,alpaca_like,prose \
      --numseqs 4 --output_len 64 --k 3,5,7 --f 1,3 --fallbacks jit,fast \
      --batch_size 1,4 --temperatures 0,0.7 --output_dir /tmp/traces

One JSON per engine configuration (method, K, fan-out, fallback; every batch size runs in
the same engine), plus
`index.json` (every config's summary and every exactness mismatch). At temperature 0
every SD/SSD output is compared token for token with AR's for the same prompts and batch
size; a mismatch is printed, listed and makes the exit code 1 (in bfloat16 near-ties can
flip; float32 is the exactness setting). Timed figures (decode tok/s, round ms) are
recorded too, after an untimed warm-up per (dataset, temperature, batch size), so that a
GPU run of the grid doubles as the real pair's end-to-end measurement: `--warm=waves` (the
default) runs every timed wave once untimed first, so the timed run meets only compiled
shapes (its `compilations` says so); `first` warms with the first wave alone (half the
time; later waves may still compile: page-table widths and prompt buckets differ);
`none` times the first run (for traces whose timing is not used).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ssd_jax.engine.observe import RoundObserver


class TraceRecorder(RoundObserver):
  """Records, per sequence, every round's emitted count, accepted length and lookup result,
  and per batch round which rows were live (for "did any row miss" at this batch)."""

  def __init__(self):
    super().__init__()
    self.per_seq: dict[int, dict[str, list[int]]] = {}
    self.batch_rounds: list[list[tuple[int, int]]] = []  # per round: (looked_up, hit) rows

  def round_read(self, rows, count, info) -> None:
    acc = info.get("accepted")
    hit, looked = info.get("hit"), info.get("looked_up")
    this_round = []
    for i, seq in enumerate(rows):
      # The same rule as the host loop's _drain: a finished row (None) or one the device
      # already stopped (count 0) is not a round of that sequence.
      if seq is None or int(count[i]) == 0:
        continue
      rec = self.per_seq.setdefault(seq.seq_id, {"count": [], "accepted": [], "hit": []})
      rec["count"].append(int(count[i]))
      rec["accepted"].append(int(acc[i]) if acc is not None else 0)
      if hit is not None:
        asked = bool(looked[i]) if looked is not None else True
        # -1: no lookup this round (the wave's first speculation is drafted, not looked up)
        rec["hit"].append(int(bool(hit[i])) if asked else -1)
        this_round.append((int(asked), int(bool(hit[i]))))
      else:
        this_round.append((0, 0))
    if this_round:
      self.batch_rounds.append(this_round)

  def seq_trace(self, seq_id: int) -> dict:
    return self.per_seq.get(seq_id, {"count": [], "accepted": [], "hit": []})


def summarize(per_seq: list[dict], batch_rounds: list | None = None) -> dict:
  """Means over every (sequence, round): what the speed-up model reads.

  tokens_per_round  committed tokens per row-round (accepted + 1, less at a stop);
  mean_accepted     accepted draft tokens per row-round (the engine's definition);
  hit_rate          hits / lookups (the engine's cache_hit_rate);
  p_any_miss        batch rounds in which some looked-up row missed / batch rounds with a
                    lookup (what the jit fallback pays for at the batch it ran with);
  accepted_after    mean accepted in the round after a hit / after a miss (the `fast`
                    fallback's cheap speculation accepts little: this measures how little).
  """
  counts = [c for s in per_seq for c in s["count"]]
  acc = [a for s in per_seq for a in s["accepted"]]
  hits = [h for s in per_seq for h in s["hit"] if h >= 0]
  out = {"row_rounds": len(counts),
         "tokens": int(sum(counts)),
         "tokens_per_round": float(np.mean(counts)) if counts else None,
         "mean_accepted": float(np.mean(acc)) if acc else None,
         "accepted_hist": np.bincount(acc).tolist() if acc else [],
         "lookups": len(hits),
         "hit_rate": float(np.mean(hits)) if hits else None}
  # accepted length of a round given how its speculation was produced (hit in the same
  # round's info: the lookup that produced the speculation this round verified)
  after = {"hit": [], "miss": []}
  for s in per_seq:
    for a, h in zip(s["accepted"], s["hit"]):
      if h >= 0:
        after["hit" if h else "miss"].append(a)
  out["accepted_after"] = {k: (float(np.mean(v)) if v else None) for k, v in after.items()}
  if batch_rounds:
    with_lookup = [r for r in batch_rounds if any(asked for asked, _ in r)]
    any_miss = [any(asked and not h for asked, h in r) for r in with_lookup]
    out["batch_rounds"] = len(batch_rounds)
    out["p_any_miss"] = float(np.mean(any_miss)) if any_miss else None
  return out


def p_any_miss_at(hit_rate: float, batch: int) -> float:
  """P(some row of `batch` misses) if rows hit independently at `hit_rate` (the speed-up
  model's assumption for batch sizes a trace did not run at; rows of a wave are
  independent sequences, but their difficulty is correlated within a dataset, so this is
  an upper bound when misses cluster on the same rounds)."""
  return 1.0 - hit_rate ** batch


# -- the grid ------------------------------------------------------------------------------
def config_name(c: dict) -> str:
  """The engine configuration's name (the batch sizes run inside one engine)."""
  parts = [c["method"]]
  if c["method"] != "ar":
    parts.append(f"k{c['k']}")
  if c["method"] == "ssd":
    parts.append(f"f{c['f']}" if not c.get("fanout_hit") else
                 "fan" + "-".join(map(str, c["fanout_hit"])))
    parts.append(c["fallback"])
  return "_".join(parts)


def grid(methods, ks, fs, fanouts, fallbacks, batches) -> list[dict]:
  """AR first (the exactness reference), then SD per K, then SSD per K x fan-out x
  fallback; fan-out lists (hit:miss) apply to the K they fit (len = K+1). One engine per
  entry runs every batch size (max_batch_size = the largest; the engine compiles one
  bucket per power-of-two batch), so the grid builds each model pair once per entry."""
  batches = sorted(batches)
  out = [{"method": "ar", "batches": batches}]
  for k in ks:
    if "sd" in methods:
      out.append({"method": "sd", "k": k, "batches": batches})
    if "ssd" in methods:
      shapes = [{"f": f} for f in fs]
      for hit, miss in fanouts:
        if len(hit) == k + 1:
          shapes.append({"f": max(hit), "fanout_hit": hit, "fanout_miss": miss})
      for sh in shapes:
        for fb in fallbacks:
          out.append({"method": "ssd", "k": k, "fallback": fb, "batches": batches, **sh})
  return out


WARM_MODES = ("none", "first", "waves")


def run_config(c: dict, workloads, temperatures, output_len: int, make_llm, ar_tokens: dict,
               warm: str = "waves", log=print) -> dict:
  """One engine configuration over every workload, temperature and batch size: traces,
  summaries, the engine's own metrics, and (T=0) the exactness check against ar_tokens
  (keyed by dataset and batch: the same prompts in the same waves)."""
  from ssd_jax import SamplingParams
  if warm not in WARM_MODES:
    raise ValueError(f"warm={warm!r}: use one of {', '.join(WARM_MODES)}")
  t0 = time.perf_counter()
  llm = make_llm(c)
  res = {"config": c, "load_s": time.perf_counter() - t0, "datasets": {}, "mismatches": []}
  # AR is the exactness reference and has no acceptance to trace: temperature 0 only
  temps = ([t for t in temperatures if t == 0] or temperatures[:1]) if c["method"] == "ar" \
      else temperatures
  for w in workloads:
    for temp in temps:
      for b in c["batches"]:
        params = SamplingParams(max_new_tokens=output_len, temperature=temp, seed=0,
                                ignore_eos=True)
        # Compile what the timed run will meet: its every wave, or only the first. Both
        # start from an empty prefix cache, so that the warm-up prefills what the timed run
        # will (earlier runs' cached prefixes would shorten its prefills to other shapes).
        warm_prompts = {"waves": len(w.prompts), "first": b, "none": 0}[warm]
        for i in range(0, min(warm_prompts, len(w.prompts)), b):
          if i == 0 and hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
          llm.generate(w.prompts[i:i + b], params, chat_template=w.chat)
        if hasattr(llm, "reset_prefix_cache"):
          llm.reset_prefix_cache()
        rec = TraceRecorder()
        outs, decode_s, rounds, compiles = [], 0.0, 0, 0
        for i in range(0, len(w.prompts), b):  # one wave per batch of prompts
          outs += llm.generate(w.prompts[i:i + b], params, chat_template=w.chat,
                               observer=rec)
          m = llm.last_metrics
          decode_s += m["round_ms"] * m["num_rounds"] / 1e3
          rounds += m["num_rounds"]
          compiles += m["compilations"]
        seqs = [rec.seq_trace(sid) for sid in sorted(rec.per_seq)]
        n_dec = sum(len(o.token_ids) - 1 for o in outs)  # the first token is the prefill's
        entry = {"summary": summarize(seqs, rec.batch_rounds),
                 "timing": {"decode_s": decode_s, "batch_rounds": rounds,
                            "decode_tokens_per_s": n_dec / decode_s if decode_s else None,
                            "round_ms": 1e3 * decode_s / rounds if rounds else None,
                            "compilations": compiles},
                 "per_seq": seqs}
        tokens = [o.token_ids for o in outs]
        key = (w.name, b)
        if temp == 0:
          if c["method"] == "ar":
            ar_tokens[key] = tokens
          elif key in ar_tokens:
            bad = [j for j, (x, y) in enumerate(zip(ar_tokens[key], tokens)) if x != y]
            entry["exact_vs_ar"] = not bad
            for j in bad:
              first = next((p for p, (x, y) in enumerate(zip(ar_tokens[key][j], tokens[j]))
                            if x != y), min(len(tokens[j]), len(ar_tokens[key][j])))
              mm = {"config": config_name(c), "dataset": w.name, "batch": b, "prompt": j,
                    "first_diff": first}
              res["mismatches"].append(mm)
              log(f"[traces] EXACTNESS MISMATCH {mm}")
        res["datasets"].setdefault(w.name, {}).setdefault(str(temp), {})[str(b)] = entry
        s, tm = entry["summary"], entry["timing"]
        log(f"[traces] {config_name(c):22s} {w.name:12s} T={temp:<4} b={b:<3d} rounds "
            f"{s['row_rounds']:5d}  tok/round {s['tokens_per_round'] or 0:5.2f}  hit "
            f"{s['hit_rate'] if s['hit_rate'] is None else round(s['hit_rate'], 3)}  "
            f"decode tok/s {tm['decode_tokens_per_s'] or 0:8.1f}  compiles {compiles}")
  res["wall_s"] = time.perf_counter() - t0
  del llm
  return res


def _parse_fanouts(items) -> list[tuple[list[int], list[int]]]:
  out = []
  for item in items:
    hit, _, miss = item.partition(":")
    hit = [int(x) for x in hit.split(",")]
    out.append((hit, [int(x) for x in miss.split(",")] if miss else hit))
  return out


def main(argv) -> int:
  del argv
  from absl import flags
  F = flags.FLAGS
  from bench.datasets import build_workloads
  from ssd_jax import LLM
  os.makedirs(F.output_dir, exist_ok=True)
  workloads = build_workloads(F.datasets, F.numseqs)
  temps = [float(t) for t in F.temperatures]
  configs = grid(F.methods, [int(k) for k in F.k], [int(f) for f in F.f],
                 _parse_fanouts(F.fanout), F.fallbacks, [int(b) for b in F.batch_size])
  if F.max_configs:
    configs = configs[:F.max_configs]

  def make_llm(c):
    kw = dict(method=c["method"], dtype=F.dtype, max_batch_size=max(c["batches"]),
              max_model_len=F.max_model_len, draft_devices=F.draft_devices
              if c["method"] == "ssd" else 0)
    if c["method"] != "ar":
      kw.update(k=c["k"])
    if c["method"] == "ssd":
      kw.update(f=c["f"], fallback=c["fallback"], fanout_hit=c.get("fanout_hit"),
                fanout_miss=c.get("fanout_miss"))
    model = F.model or None
    draft = (F.draft or None) if c["method"] != "ar" else None
    return LLM(model, draft, **kw)

  index = {"argv": sys.argv, "datasets": {w.name: w.info for w in workloads},
           "dtype": F.dtype, "output_len": F.output_len, "configs": [], "mismatches": [],
           "errors": []}
  ar_tokens: dict = {}
  t_start = time.perf_counter()
  for c in configs:
    if F.budget_s and time.perf_counter() - t_start > F.budget_s:
      index["errors"].append({"config": config_name(c), "error": "budget spent: not run"})
      continue
    try:
      res = run_config(c, workloads, temps, F.output_len, make_llm, ar_tokens, warm=F.warm)
    except Exception as e:  # noqa: BLE001 - a grid reports and goes on
      index["errors"].append({"config": config_name(c), "error": f"{type(e).__name__}: {e}"[:400]})
      print(f"[traces] {config_name(c)} failed: {e}", flush=True)
      continue
    res["dtype"], res["output_len"] = F.dtype, F.output_len
    name = config_name(c)
    with open(os.path.join(F.output_dir, f"trace_{name}.json"), "w") as fh:
      json.dump(res, fh, separators=(",", ":"))
    index["configs"].append({"name": name, "config": c, "wall_s": res["wall_s"],
                             "summary": {d: {t: {b: e["summary"] | e["timing"] | {
                                 "exact_vs_ar": e.get("exact_vs_ar")}
                                 for b, e in tv.items()} for t, tv in v.items()}
                                 for d, v in res["datasets"].items()}})
    index["mismatches"] += res["mismatches"]
    with open(os.path.join(F.output_dir, "index.json"), "w") as fh:  # after every config
      json.dump(index, fh, indent=1)
  print(f"[traces] {len(index['configs'])} configs, {len(index['mismatches'])} mismatches, "
        f"{len(index['errors'])} errors, {time.perf_counter() - t_start:.0f}s", flush=True)
  return 1 if index["mismatches"] else (3 if index["errors"] else 0)


def define_flags():
  from absl import flags
  flags.DEFINE_list("datasets", ["humaneval", "alpaca_like", "prose"], "Prompt sets.")
  flags.DEFINE_integer("numseqs", 4, "Prompts per set.")
  flags.DEFINE_integer("output_len", 64, "New tokens per prompt (EOS ignored).")
  flags.DEFINE_list("methods", ["sd", "ssd"], "sd, ssd (AR always runs: the reference).")
  flags.DEFINE_list("k", ["3", "5", "7"], "Draft tokens per round.")
  flags.DEFINE_list("f", ["1", "3"], "SSD uniform fan-outs.")
  flags.DEFINE_multi_string("fanout", [], "A Saguaro fan-out pair HIT[:MISS], e.g. "
                            "4,3,3,2,2,2,2,2:8,4,3,2,1,1,1,0 (used for the K it fits).")
  flags.DEFINE_list("fallbacks", ["jit", "fast"], "SSD fallbacks.")
  flags.DEFINE_list("batch_size", ["4"], "Batch sizes (max_batch_size = batch).")
  flags.DEFINE_list("temperatures", ["0", "0.7"], "Sampling temperatures.")
  flags.DEFINE_string("dtype", None, "Engine dtype (default: the engine's).")
  flags.DEFINE_integer("max_model_len", 1024, "Engine max_model_len.")
  flags.DEFINE_integer("draft_devices", 0, "SSD's draft mesh (0: the target's device).")
  flags.DEFINE_string("model", None, "Target checkpoint (default: the embedded SmolLM2).")
  flags.DEFINE_string("draft", None, "Draft checkpoint (default: the bundled draft).")
  flags.DEFINE_enum("warm", "waves", list(WARM_MODES),
                    "Untimed warm-up before each timed run: every wave, the first, none.")
  flags.DEFINE_integer("max_configs", 0, "Run only the first N configs (0: all).")
  flags.DEFINE_float("budget_s", 0, "Start no config after this many seconds (0: none).")
  flags.DEFINE_string("output_dir", "/tmp/ssd_jax_traces", "Where the JSON goes.")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from absl import app
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
