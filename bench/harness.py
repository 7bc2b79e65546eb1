r"""Benchmark AR, SD and SSD over offline prompt sets.

Per method, dataset and batch size it reports output tokens/s, TTFT, mean accepted length,
cache hit rate, per-round time (and its split when profiled), compilations after warm-up,
and the memory-bandwidth roofline (bench/roofline.py). At temperature 0 it checks that SD
and SSD produce exactly AR's tokens for every benchmarked prompt and exits non-zero,
loudly, on any mismatch.

  PYTHONPATH=$PWD python bench/harness.py --model /path/target --draft /path/draft \
      --methods ar,sd,ssd --all --numseqs 16 --output_len 256 --batch_size 1,8 \
      --output_json out.json --plot out.png

  # random-weight timing (shapes of real models, no tokenizer, fixed-length prompts):
  PYTHONPATH=$PWD python bench/harness.py --random_weights --model llama-3.1-8b \
      --draft llama-3.2-1b --dataset prose --numseqs 1 --prompt_len 128 --output_len 256 \
      --dtype bfloat16

  # a dry run on a CPU: the real engine on tiny in-memory models (mostly compile time)
  PYTHONPATH=$PWD python bench/harness.py --engine tiny --prompt_len 16 --output_len 16

Results from --random_weights are labelled 'random-weight timing': acceptance and cache
hits of random weights mean nothing, so no speed-up over AR is reported for them.
Exit codes: 0 ok, 1 an SD/SSD output differs from AR's, 2 usage error, 3 a method failed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any, Callable

from bench import checkpoints, roofline
from bench.config import METHODS, BenchConfig, config_from_flags, define_flags
from bench.datasets import Workload, build_workloads, fix_lengths
from bench.errors import BenchError
from bench.report import (RANDOM_LABEL, SCHEMA, aggregate, first_mismatch, fmt,
                          format_table, num, profile_times)


def default_factory(cfg: BenchConfig) -> Callable:
  """make_llm(method, model, draft, profile) -> ssd_jax.LLM with cfg's engine options.
  With cfg.engine == "tiny", model and draft are one tiny in-memory Transformer
  (checkpoints.tiny_model), whatever the paths say."""
  from ssd_jax import LLM
  tiny = checkpoints.tiny_model() if cfg.engine == "tiny" else None

  def make(method, model, draft, profile):
    if tiny is not None:
      model = draft = tiny
    dd = cfg.draft_devices if method in cfg.draft_devices_for else 0
    return LLM(model=model, draft=None if method == "ar" else draft, method=method,
               mesh=cfg.mesh, draft_devices=dd, dtype=cfg.dtype, k=cfg.k, f=cfg.f,
               fanout_hit=list(cfg.fanout_hit) if cfg.fanout_hit else None,
               fanout_miss=list(cfg.fanout_miss) if cfg.fanout_miss else None,
               fallback=None if cfg.fallback == "auto" else cfg.fallback,
               sampler_x=cfg.sampler_x,
               max_batch_size=max(cfg.batch_sizes), max_model_len=cfg.max_model_len,
               attention_impl=cfg.attention_impl, profile=profile)
  return make


class Runner:
  """Runs every method of a BenchConfig and writes the report (bench/README.md says what
  each field means). `factory(method, model, draft, profile)` builds an engine with the
  ssd_jax.LLM interface; default: default_factory(cfg)."""

  def __init__(self, cfg: BenchConfig, factory: Callable | None = None, log=None):
    cfg.validate()
    self.cfg = cfg
    self.log = log or ((lambda *a: None) if cfg.quiet else
                       (lambda *a: print(*a, file=sys.stderr, flush=True)))
    self.make_llm = factory or default_factory(cfg)
    from ssd_jax import SamplingParams
    self.SamplingParams = SamplingParams
    self.report: dict[str, Any] = {
        "schema": SCHEMA,
        "label": RANDOM_LABEL if cfg.random_weights else (cfg.label or ""),
        "random_weights": cfg.random_weights,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "env": self._env(),
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(cfg).items()},
        "datasets": {},
        "roofline": {},
        "results": [],
        "mismatches": [],
        "errors": [],
        "exactness": None,
        "warnings": [],
        "partial": True,
        "ok": None,
    }
    self.ar_tokens: dict[tuple, list] = {}
    self.model_path = cfg.model
    self.draft_path = cfg.draft

  def _env(self) -> dict:
    import jax
    env = {"python": platform.python_version(), "host": platform.node(),
           "engine": self.cfg.engine, "jax": jax.__version__,
           "devices": [str(d) for d in jax.devices()]}
    for mod in ("flax", "transformers", "torch"):
      m = sys.modules.get(mod)
      if m is not None:
        env[mod] = getattr(m, "__version__", "?")
    return env

  def warn(self, msg: str):
    self.report["warnings"].append(msg)
    self.log(f"[bench] WARNING: {msg}")

  # ----- pieces

  def _bandwidth(self):
    cfg = self.cfg
    rf = self.report["roofline"]
    if cfg.bandwidth_gbps:
      rf["bandwidth"] = {"bandwidth_Bps": cfg.bandwidth_gbps * 1e9, "kind": "read",
                         "source": "--bandwidth_gbps"}
    elif cfg.measure_bandwidth:
      try:
        ceilings = roofline.measure_ceilings()
      except Exception as e:  # noqa: BLE001 -- no roofline, the benchmark still runs
        self.warn(f"bandwidth measurement failed: {e!r}")
        return
      rf["bandwidth"] = dict(ceilings["read"], kind="read", source="measured")
      rf["copy_bandwidth"] = dict(ceilings["copy"], kind="copy", source="measured")
      self.log(f"[bench] read ceiling {rf['bandwidth']['bandwidth_Bps'] / 1e9:.1f} GB/s, "
               f"copy {rf['copy_bandwidth']['bandwidth_Bps'] / 1e9:.1f} GB/s (read + "
               f"written) on {rf['bandwidth']['device']}")

  def _model_sizes(self, llm):
    rf = self.report["roofline"]
    for which, runner in (("target", llm), ("draft", llm.draft)):
      if which not in rf and runner is not None:
        rf[which] = dict(roofline.model_bytes(runner.cfg, self.cfg.dtype).to_dict(),
                         dtype=self.cfg.dtype)

  def _row_roofline(self, method: str, row: dict, mean_ctx: float) -> dict:
    rf = self.report["roofline"]
    bw = (rf.get("bandwidth") or {}).get("bandwidth_Bps")
    t = rf.get("target")
    d = rf.get("draft")
    mb = lambda x: roofline.ModelBytes(**{k: x[k] for k in (  # noqa: E731
        "num_params", "weight_bytes_total", "weight_bytes_per_step", "kv_bytes_per_token")})
    dd = self.cfg.draft_devices if method in self.cfg.draft_devices_for else 0
    return roofline.report(
        method, target=mb(t) if t else None, draft=mb(d) if d else None,
        batch=row["batch_size"], context=mean_ctx, bandwidth_Bps=bw, k=self.cfg.k,
        target_devices=roofline.mesh_devices(self.cfg.mesh), draft_devices=dd,
        measured_round_s=(row["round_ms"] or 0) / 1e3 or None,
        measured_tokens_per_s=row["decode_tokens_per_s"])

  def _params(self, max_new_tokens: int):
    c = self.cfg
    return self.SamplingParams(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                               max_new_tokens=max_new_tokens, stop=(), seed=c.seed,
                               ignore_eos=c.ignore_eos)

  def _generate(self, llm, prompts, chat, max_new_tokens):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, self._params(max_new_tokens), chat_template=chat,
                        progress=False)
    return outs, dict(llm.last_metrics), time.perf_counter() - t0

  def _check(self, method, wname, bs, idx, prompt, toks, prompt_ids):
    key = (wname, bs, idx)
    if method == "ar":
      self.ar_tokens[key] = list(toks)
      return None
    ref = self.ar_tokens.get(key)
    if ref is None:
      return None
    pos = first_mismatch(ref, list(toks))
    if pos is None:
      return True
    mm = {"method": method, "dataset": wname, "batch_size": bs, "prompt_index": idx,
          "first_mismatch_at": pos, "ar_len": len(ref), "len": len(toks),
          "ar_tokens_near": ref[max(0, pos - 3):pos + 4],
          "tokens_near": list(toks)[max(0, pos - 3):pos + 4],
          "prompt_tokens": len(prompt_ids),
          "prompt_head": (prompt[:80] if isinstance(prompt, str) else None)}
    self.report["mismatches"].append(mm)
    self.log(f"[bench] !!! MISMATCH {method.upper()} vs AR: dataset={wname} bs={bs} "
             f"prompt#{idx} first differs at generated token {pos} "
             f"(AR {mm['ar_tokens_near']} vs {method} {mm['tokens_near']})")
    return False

  # ----- main loop

  def run_method(self, method: str, workloads: list[Workload]):
    cfg = self.cfg
    t0 = time.perf_counter()
    llm = self.make_llm(method, self.model_path, self.draft_path, cfg.profile)
    load_s = time.perf_counter() - t0
    self.log(f"[bench] {method}: engine ready in {load_s:.1f}s")
    self._model_sizes(llm)
    if workloads and isinstance(workloads[0].prompts[0], str):
      if cfg.prompt_len:
        fix_lengths(workloads, cfg.prompt_len, llm.tokenizer, llm.cfg.vocab_size)
      elif llm.tokenizer is None:
        raise BenchError("the model has no tokenizer, so text prompts cannot run: pass "
                         "--prompt_len N (prompts become N token ids)")
    check = cfg.check_exact and cfg.temperature == 0.0
    for bs in cfg.batch_sizes:
      t1 = time.perf_counter()
      warm_s = self._warmup(llm, bs, workloads)
      warm_wall = time.perf_counter() - t1
      if cfg.warmup_generate:
        w = workloads[0]
        self._generate(llm, w.prompts[:bs], w.chat, cfg.output_len)
      warm_total = time.perf_counter() - t1
      self.log(f"[bench] {method} bs={bs}: warm-up {warm_total:.1f}s "
               f"(warmup() {warm_wall:.1f}s)")
      for w in workloads:
        self._run_workload(llm, method, w, bs, check, load_s=load_s, warmup_s=warm_total,
                           engine_warmup_s=warm_s)
      if cfg.split_pass and not cfg.profile:
        self._split_pass(llm, method, bs, workloads)
    del llm
    gc.collect()

  def _run_workload(self, llm, method, w: Workload, bs: int, check: bool, **timings):
    cfg = self.cfg
    calls, mismatched, checked, ctx, tokens_all = [], 0, 0, [], []
    # The same prompts run again at every batch size: forget their cached prefixes, so
    # that every run prefills its prompts whole.
    llm.reset_prefix_cache()
    for bi, batch in enumerate(_batches(w.prompts, bs)):
      outs, m, wall = self._generate(llm, batch, w.chat, cfg.output_len)
      calls.append({"m": m, "wall_s": wall, "n": len(batch),
                    "output_tokens": sum(len(o.token_ids) for o in outs),
                    "cached": sum(o.metrics["prompt_cached_tokens"] for o in outs)})
      for j, (p, o) in enumerate(zip(batch, outs)):
        ctx.append(len(o.prompt_token_ids) + len(o.token_ids) / 2)
        if cfg.save_tokens:
          tokens_all.append(list(o.token_ids))
        if check:
          ok = self._check(method, w.name, bs, bi * bs + j, p, o.token_ids,
                           o.prompt_token_ids)
          if ok is not None:
            checked += 1
            mismatched += (not ok)
    row = aggregate(calls, bs)
    row.update(method=method, dataset=w.name, load_s=timings["load_s"],
               warmup_s=timings["warmup_s"], engine_warmup_s=num(timings["engine_warmup_s"]),
               prompt_cached_tokens=sum(c["cached"] for c in calls),
               compilations_per_call=[num(c["m"].get("compilations")) for c in calls])
    if row["prompt_cached_tokens"]:
      self.warn(f"{method} {w.name} bs={bs}: {row['prompt_cached_tokens']} prompt tokens "
                "came from the prefix cache (prompts of one set sharing a prefix): TTFT is "
                "lower than for fresh prompts")
    src = "profiled runs (--profile)" if cfg.profile else None
    row["time_split_source"] = src if row["time_split_per_round_ms"] else None
    row["profiled_source"] = src if row["profiled"] else None
    mean_ctx = sum(ctx) / len(ctx) if ctx else (cfg.prompt_len or 0) + cfg.output_len / 2
    row["roofline"] = self._row_roofline(method, row, mean_ctx)
    row["exact_vs_ar"] = ({"checked": checked, "mismatches": mismatched}
                          if method != "ar" and check else None)
    if tokens_all:
      row["token_ids"] = tokens_all
    if row["compilations"]:
      self.warn(f"{method} {w.name} bs={bs}: {row['compilations']} compilation(s) during "
                "timed runs (warm-up did not cover these shapes)")
    self.report["results"].append(row)
    self.log(f"[bench] {method:>3} {w.name:<12} bs={bs:<3} "
             f"{fmt(row['tokens_per_s'], '.1f')} tok/s  ttft {fmt(row['ttft_s'], '.3f')}s  "
             f"acc {fmt(row['mean_accepted'], '.2f')}  hit {fmt(row['cache_hit_rate'], '.2f')}")
    self.flush()

  def _split_pass(self, llm, method, bs, workloads):
    """One extra profiled batch for the per-round split (profile mode blocks at every
    round, so the timed numbers stay unprofiled)."""
    w = workloads[0]
    llm.reset_prefix_cache()
    llm.profile = True
    try:
      _, m, _ = self._generate(llm, w.prompts[:bs], w.chat,
                               self.cfg.split_pass_tokens or self.cfg.output_len)
    except Exception as e:  # noqa: BLE001 -- the timed rows stand without their split
      self.warn(f"{method}: profiled split pass failed: {e!r}")
      return
    finally:
      llm.profile = False
    profiled, phases = profile_times(m)
    src = (f"separate profiled pass: {w.name}, first batch, "
           f"{int(num(m.get('num_rounds')) or 0)} rounds")
    for row in self.report["results"]:
      if row["method"] == method and row["batch_size"] == bs:
        for key, src_key, value in (("time_split_per_round_ms", "time_split_source", phases),
                                    ("profiled", "profiled_source", profiled)):
          if value and not row[key]:
            row[key], row[src_key] = value, src
        row["split_pass_compilations"] = num(m.get("compilations"))

  def _warmup(self, llm, bs, workloads) -> float:
    """llm.warmup() for every shape the timed runs will use, so that they compile nothing:
    the batch size (and the last, partial batch), and one prompt length per combination
    of (power-of-two prompt bucket, power-of-two KV-page counts for prompt + max_new_tokens
    with and without speculation slack) -- the longest prompt of each -- with the timed
    runs' max_new_tokens. (Prefills of suffixes after cached prefix pages are warmed by
    llm.warmup() itself.)"""
    cfg = self.cfg
    page = llm.target.page_size
    slack = 2 * (cfg.k + 1)
    pow2 = lambda n: 1 << max(0, (n - 1).bit_length())  # noqa: E731
    reps: dict[tuple, int] = {}
    lengths = [len(llm.encode(p, w.chat)) for w in workloads for p in w.prompts]
    for n in lengths:
      # page counts with no slack and with the most a speculative round can add: a prompt
      # whose two counts share a bucket has that bucket for any slack in between
      key = (pow2(max(n, 16)), pow2(-(-(n + cfg.output_len) // page)),
             pow2(-(-(n + cfg.output_len + slack) // page)))
      reps[key] = max(reps.get(key, 0), n)
    sizes = {bs}
    for w in workloads:
      if len(w.prompts) % bs:
        sizes.add(len(w.prompts) % bs)
    plan = [(size, length) for size in sorted(sizes) for length in sorted(set(reps.values()))]
    total = sum(llm.warmup(size, length, max_new_tokens=cfg.output_len)
                for size, length in plan)
    self.report.setdefault("warmup_shapes", {})[str(bs)] = {
        "batch_sizes": sorted(sizes), "prompt_lens": sorted(set(reps.values())),
        "calls": len(plan)}
    return total

  def flush(self):
    if self.cfg.output_json:
      d = os.path.dirname(os.path.abspath(self.cfg.output_json))
      os.makedirs(d, exist_ok=True)
      tmp = self.cfg.output_json + ".tmp"
      with open(tmp, "w") as f:
        json.dump(self.report, f, indent=1, default=str)
      os.replace(tmp, self.cfg.output_json)

  def _exactness(self) -> str:
    cfg = self.cfg
    rows = self.report["results"]
    spec = [r for r in rows if r["method"] != "ar"]
    if not (cfg.check_exact and cfg.temperature == 0.0):
      return ("not checked: temperature > 0 (outputs match AR in distribution only)"
              if cfg.temperature > 0 else "not checked (--nocheck_exact)")
    if not any(r["method"] == "ar" for r in rows) and spec:
      self.warn("not checked: AR was not run (add ar to --methods)")
      return "not checked: AR was not run (add ar to --methods)"
    if self.report["mismatches"]:
      hint = (" (bfloat16: near-ties can flip an argmax between a K+1-token verify and a "
              "1-token step; rerun with --dtype float32 to tell a bug from rounding)"
              if cfg.dtype != "float32" else "")
      return f"FAILED: {len(self.report['mismatches'])} output(s) differ from AR{hint}"
    total = sum((r["exact_vs_ar"] or {}).get("checked", 0) for r in spec)
    return f"ok: {total} SD/SSD outputs equal AR's token for token"

  def finish(self) -> int:
    cfg = self.cfg
    rows = self.report["results"]
    # speed-up over AR on the same dataset and batch size
    ar = {(r["dataset"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["method"] == "ar"}
    for r in rows:
      base = ar.get((r["dataset"], r["batch_size"]))
      if cfg.random_weights:
        r["speedup_over_ar"] = None
        r["speedup_note"] = "random weights: acceptance is meaningless; no speed-up claimed"
      else:
        r["speedup_over_ar"] = (r["tokens_per_s"] / base
                                if base and r["tokens_per_s"] else None)
    self.report["exactness"] = self._exactness()
    self.report["partial"] = False
    self.report["ok"] = not self.report["mismatches"] and not self.report["errors"]
    self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    self.flush()
    if cfg.plot:
      self._plot()
    print(format_table(self.report))
    if self.report["mismatches"]:
      bar = "!" * 78
      print(f"\n{bar}\n!!! EXACTNESS FAILURE: {self.report['exactness']}", file=sys.stderr)
      for mm in self.report["mismatches"][:10]:
        print(f"!!!   {mm['method']} {mm['dataset']} bs={mm['batch_size']} "
              f"prompt#{mm['prompt_index']} at token {mm['first_mismatch_at']}: "
              f"AR {mm['ar_tokens_near']} vs {mm['tokens_near']}", file=sys.stderr)
      print(bar, file=sys.stderr)
      return 1
    if self.report["errors"]:
      for e in self.report["errors"]:
        print(f"!!! {e['method']} FAILED: {e['error'][:300]}", file=sys.stderr)
      return 3
    return 0

  def _plot(self):
    from bench import plot as plotmod
    peer = None
    if self.cfg.peer_json and os.path.isfile(self.cfg.peer_json):
      with open(self.cfg.peer_json) as f:
        peer = json.load(f)
    try:
      plotmod.plot(self.report, self.cfg.plot, peer=peer)
      self.log(f"[bench] plot written to {self.cfg.plot}")
    except plotmod.PlotUnavailable as e:
      self.warn(str(e))

  def run(self) -> int:
    cfg = self.cfg
    conf = self.report["config"]
    conf["model_shape"] = conf["draft_shape"] = None
    where = dict(random_weights=cfg.random_weights, ckpt_root=cfg.ckpt_root, log=self.log)
    if cfg.engine != "tiny":
      self.model_path, conf["model_shape"] = checkpoints.resolve_model(cfg.model, seed=0,
                                                                       **where)
      if any(m != "ar" for m in cfg.methods):
        self.draft_path, conf["draft_shape"] = checkpoints.resolve_model(cfg.draft, seed=1,
                                                                         **where)
    conf["model_resolved"], conf["draft_resolved"] = self.model_path, self.draft_path
    workloads = build_workloads(cfg.datasets, cfg.numseqs, cfg.chat_template, self.log)
    for w in workloads:
      self.report["datasets"][w.name] = w.info
    self._bandwidth()
    for method in sorted(cfg.methods, key=METHODS.index):  # AR first: the reference
      try:
        self.run_method(method, workloads)
      except (KeyboardInterrupt, SystemExit):
        raise
      except Exception as e:  # noqa: BLE001 -- one method failing must not hide the others
        tb = traceback.format_exc()
        self.log(tb)
        self.report["errors"].append({"method": method, "error": f"{type(e).__name__}: {e}"[:2000],
                                      "traceback_tail": tb[-3000:]})
        self.log(f"[bench] !!! {method} FAILED: {type(e).__name__}: {str(e)[:500]}")
        gc.collect()
        self.flush()
    for w in workloads:  # after --prompt_len changed them
      self.report["datasets"][w.name] = w.info
    return self.finish()


def _batches(items, bs):
  return [items[i:i + bs] for i in range(0, len(items), bs)]


def _on_term(signum, frame):
  raise SystemExit(128 + signum)


def main(FLAGS, factory: Callable | None = None) -> int:
  """The command line on parsed flags (define_flags); returns the exit code."""
  try:
    cfg = config_from_flags(FLAGS)
    cfg.validate()
    if FLAGS.only_write_checkpoints:
      if not cfg.random_weights:
        raise BenchError("--only_write_checkpoints needs --random_weights")
      log = lambda *a: print(*a, flush=True)  # noqa: E731
      for name, seed in ((cfg.model, 0), (cfg.draft, 1)):
        if name:
          print(checkpoints.resolve_model(name, random_weights=True, ckpt_root=cfg.ckpt_root,
                                          seed=seed, log=log)[0], flush=True)
      return 0
    runner = Runner(cfg, factory=factory)
  except BenchError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  on_term = signal.signal(signal.SIGTERM, _on_term)  # `timeout` kills: keep the JSON
  try:
    return runner.run()
  except BenchError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  finally:
    signal.signal(signal.SIGTERM, on_term)
    if runner.report.get("partial"):
      runner.report["warnings"].append("run did not finish: partial results")
      runner.flush()
      if runner.report["results"]:
        print(format_table(runner.report))


if __name__ == "__main__":
  from absl import app, flags
  from bench import config
  flag_values = define_flags()
  flags.adopt_module_key_flags(config)  # --help lists them (they are defined there)
  app.run(lambda argv: sys.exit(main(flag_values)))
