r"""The peer: PyTorch + transformers `generate` on the same GPU and the same weights.

* AR: greedy `generate` with a static KV cache, compiled (transformers compiles the decode
  step itself when the cache is static on a GPU, mode "reduce-overhead"; --compile=manual
  wraps `model.forward` in `torch.compile` instead). If compiling fails it falls back to
  plain eager decoding with a dynamic cache and says so in the result's `mode`.
* SD: transformers' assisted generation with the same draft (`assistant_model=`),
  K = --k draft tokens per round, constant schedule, no early stop on draft confidence,
  greedy, batch 1 (transformers' limit). Assisted generation needs a dynamic cache, so it
  runs eagerly.

  PYTHONPATH=$PWD python bench/peer_transformers.py --model /tmp/t --draft /tmp/d --dataset prose \
      --numseqs 1 --prompt_len 128 --output_len 256 --k 7 --output_json peer.json

Reports tokens/s (output tokens over generate() wall time, as our bench), decode tokens/s
and ms/token (after the first token), TTFT, as JSON. The prompts are the harness's
(bench/datasets.py, which never imports JAX: this process runs PyTorch only).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time

from bench.datasets import fixed_length_ids, prompt_sets
from bench.report import RANDOM_LABEL

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SCHEMA = "ssd_jax.peer/1"


def _flags():
  from absl import flags
  F = flags
  F.DEFINE_string("model", None, "target HF directory", required=True)
  F.DEFINE_string("draft", None, "draft HF directory (for sd)")
  F.DEFINE_list("methods", ["ar", "sd"], "ar (generate) and/or sd (assisted generation)")
  F.DEFINE_enum("dataset", "prose", list(prompt_sets.DATASETS), "prompt set")
  F.DEFINE_bool("all", False, "every prompt set that loads here")
  F.DEFINE_integer("numseqs", 1, "prompts per dataset")
  F.DEFINE_integer("prompt_len", None, "exactly this many prompt tokens (recommended: "
                   "fixed shapes keep the compiled static-cache step from recompiling)")
  F.DEFINE_integer("output_len", 128, "new tokens per prompt")
  F.DEFINE_integer("batch_size", 1, "AR batch size (needs --prompt_len when > 1)")
  F.DEFINE_integer("k", 7, "assisted generation: draft tokens per round")
  F.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "weights dtype")
  F.DEFINE_enum("compile", "auto", ["auto", "manual", "off"],
                "auto: static cache + transformers' own compile on GPU (eager on CPU)")
  F.DEFINE_string("device", None, "cuda or cpu (default: cuda if available)")
  F.DEFINE_integer("reps", 2, "timed AR repetitions per prompt (median)")
  F.DEFINE_integer("sd_reps", 1, "timed assisted-generation repetitions per prompt")
  F.DEFINE_integer("warmup_runs", 2, "untimed AR runs before timing (compile + graphs)")
  F.DEFINE_bool("random_weights", False, f"label results '{RANDOM_LABEL}'")
  F.DEFINE_bool("save_tokens", True, "keep the first prompt's generated ids in the JSON")
  F.DEFINE_string("output_json", None, "write results here")
  return flags.FLAGS


class Peer:
  def __init__(self, *, model, draft=None, dtype="bfloat16", device=None, compile="auto",
               log=None):
    import torch
    self.torch = torch
    self.log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = getattr(torch, dtype)
    self.compile = compile
    self.model_path, self.draft_path = model, draft
    self.errors: list[str] = []
    t0 = time.perf_counter()
    self.model = self._load(model)
    self.load_s = time.perf_counter() - t0
    self.log(f"[peer] target loaded in {self.load_s:.1f}s on {self.device}")
    self.draft = None
    self.ar_mode = None
    self._orig_forward = self.model.forward

  def _load(self, path):
    from transformers import AutoModelForCausalLM
    kw = {"dtype": self.dtype}
    try:
      import accelerate  # noqa: F401
      kw["device_map"] = self.device
    except ImportError:
      pass
    try:
      m = AutoModelForCausalLM.from_pretrained(path, **kw)
    except TypeError:  # older transformers: torch_dtype
      kw["torch_dtype"] = kw.pop("dtype")
      m = AutoModelForCausalLM.from_pretrained(path, **kw)
    m = m.to(self.device).eval()
    gc = m.generation_config
    gc.eos_token_id = None         # exactly max_new_tokens (like ignore_eos)
    gc.pad_token_id = gc.pad_token_id if gc.pad_token_id is not None else 0
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    return m

  def load_draft(self, k: int):
    if self.draft is None:
      t0 = time.perf_counter()
      self.draft = self._load(self.draft_path)
      self.log(f"[peer] draft loaded in {time.perf_counter() - t0:.1f}s")
    g = self.draft.generation_config
    g.num_assistant_tokens = k
    g.num_assistant_tokens_schedule = "constant"
    g.assistant_confidence_threshold = 0.0  # never stop drafting early

  def sync(self):
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()

  # ----- AR

  def setup_ar(self):
    """Static cache + compile where possible; returns the mode string."""
    torch = self.torch
    mode = "eager, dynamic cache"
    if self.compile == "off" or (self.compile == "auto" and not self.device.startswith("cuda")):
      self.ar_kwargs = {"cache_implementation": None, "disable_compile": True}
    elif self.compile == "auto":
      self.ar_kwargs = {"cache_implementation": "static"}
      mode = "static cache + torch.compile (transformers auto, reduce-overhead)"
    else:
      self.model.forward = torch.compile(self._orig_forward, mode="reduce-overhead",
                                         fullgraph=True)
      self.ar_kwargs = {"cache_implementation": "static", "disable_compile": True}
      mode = "static cache + torch.compile(model.forward, reduce-overhead, fullgraph)"
    self.ar_mode = mode
    return mode

  def fall_back_to_eager(self, err):
    torch = self.torch
    self.model.forward = self._orig_forward
    with contextlib.suppress(Exception):
      torch._dynamo.reset()
    self.ar_kwargs = {"cache_implementation": None, "disable_compile": True}
    self.ar_mode = f"eager, dynamic cache (compile failed: {type(err).__name__}: {str(err)[:160]})"
    self.errors.append(f"AR compile failed, fell back to eager: {err!r}"[:500])
    self.log(f"[peer] WARNING: {self.ar_mode}")

  def _gen(self, ids, max_new_tokens, streamer=None, **kw):
    torch = self.torch
    with torch.inference_mode():
      return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, min_new_tokens=None,
                                 do_sample=False, streamer=streamer, **kw)

  def timed(self, ids, max_new_tokens, **kw):
    self.sync()
    t0 = time.perf_counter()
    out = self._gen(ids, max_new_tokens, **kw)
    self.sync()
    return out, time.perf_counter() - t0

  def ttft(self, ids, max_new_tokens, **kw):
    """Seconds to the first generated token, from a streamed run (it syncs per token, so
    this run is not the timed one)."""
    peer = self

    class _First:
      def __init__(self):
        self.calls = 0
        self.t = None

      def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.t is None:  # call 1 is the prompt
          peer.sync()
          self.t = time.perf_counter()

      def end(self):
        pass

    s = _First()
    self.sync()
    t0 = time.perf_counter()
    self._gen(ids, max_new_tokens, streamer=s, **kw)
    return None if s.t is None else s.t - t0


def _prompt_ids(args, tokenizer, vocab_size):
  sets = prompt_sets.DATASETS if args.all else (args.dataset,)
  out = []
  for name in sets:
    try:
      ps = prompt_sets.load(name, args.numseqs)
    except prompt_sets.DatasetUnavailable as e:
      if args.all:
        print(f"[peer] skipping {name}: {e}", file=sys.stderr)
        continue
      raise
    ids_list = []
    for p in ps.prompts:
      if args.prompt_len:
        ids = fixed_length_ids(p, args.prompt_len, tokenizer, vocab_size)
      else:
        if tokenizer is None:
          raise SystemExit("peer: the model has no tokenizer; pass --prompt_len")
        if ps.chat and getattr(tokenizer, "chat_template", None):
          ids = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                              add_generation_prompt=True, tokenize=True)
          if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
          ids = list(ids)
        else:
          ids = list(tokenizer.encode(p))
      ids_list.append(ids)
    out.append((name, ps.describe(), ids_list))
  return out


def run(args, log=None) -> dict:
  import torch
  log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
  report = {"schema": SCHEMA, "label": RANDOM_LABEL if args.random_weights else "",
            "random_weights": bool(args.random_weights),
            "config": {k: getattr(args, k) for k in (
                "model", "draft", "methods", "dataset", "numseqs", "prompt_len", "output_len",
                "batch_size", "k", "dtype", "compile", "reps", "sd_reps", "warmup_runs")},
            "env": {"python": platform.python_version(), "torch": torch.__version__},
            "results": [], "errors": [], "partial": True}
  import transformers
  report["env"]["transformers"] = transformers.__version__
  peer = Peer(model=args.model, draft=args.draft, dtype=args.dtype, device=args.device,
              compile=args.compile, log=log)
  report["env"]["device"] = (torch.cuda.get_device_name(0) if peer.device.startswith("cuda")
                             else "cpu")
  report["load_s"] = peer.load_s
  tokenizer = None
  try:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
  except Exception:  # noqa: BLE001 -- random-weight checkpoints have no tokenizer
    tokenizer = None
  vocab = int(peer.model.config.vocab_size)
  sets = _prompt_ids(args, tokenizer, vocab)
  dev = peer.device

  def flush():
    if args.output_json:
      os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
      with open(args.output_json, "w") as f:
        json.dump(report, f, indent=1, default=str)

  def row(method, name, bs, times, ttfts, n_out, mode, extra=None, tokens=None):
    total = statistics.median(times)
    ttft = statistics.median(ttfts) if ttfts else None
    decode = total - ttft if ttft is not None and total > ttft else total
    r = {"method": method, "dataset": name, "batch_size": bs, "mode": mode,
         "output_tokens_per_seq": n_out, "total_s": total, "samples_s": times,
         "ttft_s": ttft, "decode_s": decode,
         # as ours: output tokens over generate() wall time (prefill included) ...
         "tokens_per_s": bs * n_out / total if total > 0 else None,
         # ... and the tokens after the first over the time after the first
         "decode_tokens_per_s": bs * (n_out - 1) / decode if decode > 0 and n_out > 1 else None,
         "ms_per_token": 1e3 * decode / (n_out - 1) if n_out > 1 else None}
    if extra:
      r.update(extra)
    if tokens is not None and args.save_tokens:
      r["token_ids"] = [tokens]
    report["results"].append(r)
    log(f"[peer] {method} {name} bs={bs}: {r['tokens_per_s'] or 0:.1f} tok/s, "
        f"{r['ms_per_token'] or 0:.2f} ms/token ({mode})")
    flush()

  n_new = args.output_len
  if "ar" in args.methods:
    peer.setup_ar()
    for name, info, ids_list in sets:
      bs = args.batch_size
      if bs > 1 and not args.prompt_len:
        report["errors"].append("AR batch > 1 needs --prompt_len (equal lengths); ran bs=1")
        bs = 1
      batches = [ids_list[i:i + bs] for i in range(0, len(ids_list), bs)]
      batches = [b for b in batches if len(b) == bs] or batches[:1]
      times, ttfts, first = [], [], None
      for bi, b in enumerate(batches):
        ids = torch.tensor(b, dtype=torch.long, device=dev)
        if bi == 0:
          t0 = time.perf_counter()
          try:
            for _ in range(max(1, args.warmup_runs)):
              peer.timed(ids, n_new, **peer.ar_kwargs)
          except Exception as e:  # noqa: BLE001
            peer.fall_back_to_eager(e)
            peer.timed(ids, n_new, **peer.ar_kwargs)
          report["ar_warmup_s"] = time.perf_counter() - t0
          log(f"[peer] AR warm-up {report['ar_warmup_s']:.1f}s ({peer.ar_mode})")
        for _ in range(max(1, args.reps)):
          out, dt = peer.timed(ids, n_new, **peer.ar_kwargs)
          times.append(dt)
        if first is None:
          first = out[0, ids.shape[1]:].tolist()
        with contextlib.suppress(Exception):
          t = peer.ttft(ids, n_new, **peer.ar_kwargs)
          if t is not None:
            ttfts.append(t)
      row("ar", name, bs, times, ttfts, n_new, peer.ar_mode, tokens=first)
  if "sd" in args.methods:
    if not args.draft:
      report["errors"].append("sd: no --draft given")
    else:
      # back to the uncompiled forward: assisted generation needs a dynamic cache
      peer.model.forward = peer._orig_forward
      peer.load_draft(args.k)
      rounds = {"n": 0}
      hook = peer.model.register_forward_pre_hook(
          lambda *a, **k: rounds.__setitem__("n", rounds["n"] + 1))
      sd_kw = {"assistant_model": peer.draft, "cache_implementation": None,
               "disable_compile": True}
      mode = f"assisted generation, K={args.k} constant, eager, dynamic cache"
      for name, info, ids_list in sets:
        times, ttfts, first, tpr = [], [], None, []
        for bi, p in enumerate(ids_list):
          ids = torch.tensor([p], dtype=torch.long, device=dev)
          if bi == 0:
            t0 = time.perf_counter()
            peer.timed(ids, min(16, n_new), **sd_kw)
            report["sd_warmup_s"] = time.perf_counter() - t0
          for _ in range(max(1, args.sd_reps)):
            rounds["n"] = 0
            out, dt = peer.timed(ids, n_new, **sd_kw)
            times.append(dt)
            n_got = out.shape[1] - ids.shape[1]
            if rounds["n"] > 1:  # first call is the prefill
              tpr.append(n_got / (rounds["n"] - 1))
          if first is None:
            first = out[0, ids.shape[1]:].tolist()
          if bi == 0:
            with contextlib.suppress(Exception):
              t = peer.ttft(ids, 2, **sd_kw)  # dynamic cache: length does not matter
              if t is not None:
                ttfts.append(t)
        extra = {"mean_tokens_per_round": statistics.mean(tpr) if tpr else None,
                 "k": args.k}
        row("sd", name, 1, times, ttfts, n_new, mode, extra, tokens=first)
      hook.remove()
  report["errors"].extend(peer.errors)
  report["partial"] = False
  flush()
  return report


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  bad = [m for m in args.methods if m not in ("ar", "sd")]
  if bad:
    print(f"peer: unknown methods {bad}", file=sys.stderr)
    return 2
  rep = run(args)
  from bench.plot import peer_table
  print(peer_table(rep))
  return 0


if __name__ == "__main__":
  from absl import app
  _flags()
  app.run(lambda argv: sys.exit(main(argv)))
