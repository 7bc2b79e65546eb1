r"""Benchmark AR, SD and SSD over offline prompt sets.

Per method, dataset and batch size it reports output tokens/s, TTFT, mean accepted length,
cache hit rate, per-round time (and its split when profiled), compilations after warm-up,
and the memory-bandwidth roofline (launch/roofline.py). At temperature 0 it checks that SD
and SSD produce exactly AR's tokens for every benchmarked prompt and exits non-zero,
loudly, on any mismatch.

  python launch/bench.py --model /path/target --draft /path/draft --methods ar,sd,ssd \
      --all --numseqs 16 --output_len 256 --batch_size 1,8 --output_json out.json --plot out.png

  # random-weight timing (shapes of real models, no tokenizer, fixed-length prompts):
  python launch/bench.py --random_weights --model llama-3.1-8b --draft llama-3.2-1b \
      --dataset prose --numseqs 1 --prompt_len 128 --output_len 256 --dtype bfloat16

  # the harness itself, no model (a fake engine): --engine fake

Results from --random_weights are labelled 'random-weight timing': acceptance and cache
hits of random weights mean nothing, so no speed-up over AR is reported for them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
import types
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from launch import roofline  # noqa: E402


def _prompts_module():
  """ssd_jax/data/prompts.py, loaded by path: it is stdlib-only, and importing the ssd_jax
  package would start JAX (not wanted for --engine fake, the tests, or the peer)."""
  key = "_ssd_jax_prompts"
  if key not in sys.modules:
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        key, os.path.join(_ROOT, "ssd_jax", "data", "prompts.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
  return sys.modules[key]


prompt_sets = _prompts_module()

METHODS = ("ar", "sd", "ssd")
RANDOM_LABEL = "random-weight timing"
SCHEMA = "ssd_jax.bench/1"


class BenchError(RuntimeError):
  pass


# --------------------------------------------------------------------------- config

@dataclasses.dataclass
class BenchConfig:
  model: str | None = None
  draft: str | None = None
  methods: tuple[str, ...] = METHODS
  datasets: tuple[str, ...] = ("humaneval",)
  numseqs: int = 8
  output_len: int = 128
  batch_sizes: tuple[int, ...] = (1,)
  prompt_len: int | None = None       # fixed-length token-id prompts (truncate/repeat)
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = True
  k: int = 7
  f: int = 3
  fanout_hit: tuple[int, ...] | None = None
  fanout_miss: tuple[int, ...] | None = None
  fallback: str = "auto"              # jit | fast | auto (the engine picks by batch size)
  sampler_x: float | None = None
  mesh: str = "1x1"
  draft_devices: int = 0
  draft_devices_for: tuple[str, ...] = ("ssd",)
  dtype: str = "float32"
  max_model_len: int = 2048
  attention_impl: str = "auto"
  chat_template: str = "auto"         # auto (the dataset's kind) | on | off
  random_weights: bool = False
  ckpt_root: str = "/tmp/ssd_jax_random"
  profile: bool = False               # every run profiled (time split; slower)
  split_pass: bool = True             # one extra profiled batch per method for the split
  split_pass_tokens: int | None = None  # None: --output_len (same shapes, no recompiles)
  warmup_generate: bool = False       # also generate the first batch untimed (primes the
                                      # prefix cache with a benchmark prompt: off by default)
  check_exact: bool = True
  bandwidth_gbps: float | None = None  # skip the measurement, use this (GB/s, read+write)
  measure_bandwidth: bool = True
  engine: str = "ssd_jax"             # ssd_jax | fake
  fake_mismatch: tuple[str, ...] = ()  # fake engine: methods whose output is corrupted
  output_json: str | None = None
  plot: str | None = None
  peer_json: str | None = None
  save_tokens: bool = True
  label: str = ""
  quiet: bool = False

  def validate(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad or not self.methods:
      raise BenchError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    bad = [d for d in self.datasets if d not in prompt_sets.DATASETS]
    if bad or not self.datasets:
      raise BenchError(f"--dataset: unknown {bad}; choose from "
                       f"{', '.join(prompt_sets.DATASETS)} (or --all)")
    if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
      raise BenchError(f"--batch_size must be positive integers, got {self.batch_sizes}")
    if self.numseqs < 1 or self.output_len < 1:
      raise BenchError("--numseqs and --output_len must be positive")
    if self.engine not in ("ssd_jax", "fake"):
      raise BenchError(f"--engine: {self.engine!r} is not ssd_jax or fake")
    if self.chat_template not in ("auto", "on", "off"):
      raise BenchError(f"--chat_template: {self.chat_template!r} is not auto, on or off")
    if any(m in ("sd", "ssd") for m in self.methods) and self.engine != "fake" \
        and self.draft is None and self.model is not None:
      raise BenchError("SD and SSD need --draft (a draft model path or, with "
                       "--random_weights, a shape name)")
    roofline.mesh_devices(self.mesh)
    roofline.dtype_bytes(self.dtype)


# --------------------------------------------------------------------------- models

def random_shapes() -> dict:
  try:
    from ssd_jax.checkpoint.random_init import REAL_SHAPES
  except ImportError as e:
    raise BenchError(f"--random_weights needs ssd_jax.checkpoint.random_init ({e})") from None
  return REAL_SHAPES


def ensure_random_checkpoint(name: str, root: str, dtype: str = "bfloat16", seed: int = 0,
                             log=print) -> str:
  """Directory of a random-weight HF checkpoint with the shape of `name` (a key of
  REAL_SHAPES), written under `root` unless a complete one is already there."""
  shapes = random_shapes()
  if name not in shapes:
    raise BenchError(f"unknown shape {name!r}; known: {', '.join(sorted(shapes))}")
  out = os.path.join(root, f"{name}-{dtype}-seed{seed}")
  marker = os.path.join(out, ".ssd_jax_random_complete")
  want = {"shape": name, "dtype": dtype, "seed": seed}
  if os.path.isfile(marker):
    try:
      with open(marker) as f:
        if json.load(f) == want:
          log(f"[bench] reusing random checkpoint {out}")
          return out
    except (OSError, json.JSONDecodeError):
      pass
  from ssd_jax.checkpoint.random_init import write_random_hf_checkpoint
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  write_random_hf_checkpoint(shapes[name], out, dtype=dtype, seed=seed)
  with open(marker, "w") as f:
    json.dump(want, f)
  log(f"[bench] wrote random checkpoint {name} ({dtype}, seed {seed}) to {out} in "
      f"{time.perf_counter() - t0:.1f}s")
  return out


def resolve_model(path: str | None, cfg: BenchConfig, seed: int, log) -> tuple[str | None, str | None]:
  """(path to load, shape name or None). With --random_weights a REAL_SHAPES name becomes
  a written checkpoint; a directory is used as is."""
  if path is None or cfg.engine == "fake":
    return path, None
  if cfg.random_weights and not os.path.exists(path):
    return ensure_random_checkpoint(path, cfg.ckpt_root, "bfloat16", seed, log), path
  if not os.path.exists(path):
    raise BenchError(f"model {path!r} does not exist")
  return path, None


def model_config_of(llm, path: str | None, which: str):
  """The ModelConfig of the target ('model') or draft, from the engine if it exposes one,
  else from the checkpoint directory; None if neither works."""
  names = (("model_config", "cfg", "config", "target_config") if which == "model"
           else ("draft_model_config", "draft_config"))
  cands = [getattr(llm, n, None) for n in names] if llm is not None else []
  if which == "draft" and llm is not None:
    cands.append(getattr(getattr(llm, "draft", None), "cfg", None))
  for c in cands:
    if c is not None and hasattr(c, "num_params"):
      return c
  if path and os.path.isdir(path):
    try:
      from ssd_jax.config import ModelConfig
      return ModelConfig.from_dir(path)
    except Exception:  # noqa: BLE001 -- roofline is best effort
      return None
  return None


# --------------------------------------------------------------------------- engines

class FakeLLM:
  """Implements the engine's interface with deterministic outputs and synthetic metrics,
  for testing the harness (and dry runs with --engine fake) without a model."""

  SPEED = {"ar": 100.0, "sd": 170.0, "ssd": 230.0}

  def __init__(self, model=None, draft=None, method="ar", fake_mismatch=(), vocab_size=1000,
               **kwargs):
    self.method = method
    self.kwargs = kwargs
    self.fake_mismatch = tuple(fake_mismatch)
    self.vocab_size = vocab_size
    self.last_metrics: dict = {}
    self.profile = bool(kwargs.get("profile", False))
    self.compiled: set = set()
    self.tokenizer = None
    self.cfg = _FakeConfig(vocab_size=vocab_size)
    self.draft = (None if method == "ar" else
                  types.SimpleNamespace(cfg=_FakeConfig(vocab_size=vocab_size,
                                                        num_params=10_000_000, num_layers=2)))

  def warmup(self, batch_size, prompt_len, max_new_tokens=8):
    self.compiled.add((batch_size, prompt_len))
    return 0.01

  def _ids(self, prompt):
    if isinstance(prompt, str):
      return [3 + b % (self.vocab_size - 3) for b in prompt.encode()]
    return list(prompt)

  def generate(self, prompts, sampling_params, chat_template=False, progress=True):
    outs = []
    n = sampling_params.max_new_tokens
    for p in prompts:
      ids = self._ids(p)
      h = int(hashlib.sha256(repr(ids).encode()).hexdigest()[:8], 16)
      toks = [(h + 31 * i) % self.vocab_size for i in range(n)]
      if self.method in self.fake_mismatch and n > 2:
        toks[n // 2] = (toks[n // 2] + 1) % self.vocab_size
      outs.append(_FakeOutput(p if isinstance(p, str) else None, ids, toks))
    rate = self.SPEED[self.method] * len(prompts) ** 0.8
    rounds = n if self.method == "ar" else max(1, n // 3)
    ttft = 0.02 * len(prompts)
    decode_s = n * len(prompts) / rate
    self.last_metrics = {
        "method": self.method, "num_requests": len(prompts),
        "output_tokens": n * len(prompts), "wall_s": ttft + decode_s,
        "tokens_per_s": n * len(prompts) / (ttft + decode_s),
        "decode_tokens_per_s": (n - 1) * len(prompts) / decode_s,
        "ttft_s": ttft, "num_rounds": rounds, "round_ms": 1e3 * decode_s / rounds,
        "mean_accepted": None if self.method == "ar" else 2.0,
        "cache_hit_rate": 0.7 if self.method == "ssd" else None,
        "compilations": 0,
    }
    if self.profile:
      self.last_metrics["profiled_round_ms"] = 1e3 * decode_s / rounds
      self.last_metrics["time_split"] = {"verify_s": 0.5 * decode_s, "draft_s": 0.3 * decode_s,
                                         "transfer_s": 0.1 * decode_s,
                                         "host_s": 0.1 * decode_s}
    return outs


@dataclasses.dataclass(frozen=True)
class _FakeConfig:
  """Sizes for the fake engine's roofline (a 100M-parameter-ish decoder)."""
  vocab_size: int = 1000
  hidden_size: int = 1024
  num_layers: int = 8
  num_kv_heads: int = 4
  head_dim: int = 64
  tie_word_embeddings: bool = True
  num_params: int = 100_000_000


@dataclasses.dataclass
class _FakeOutput:
  prompt: str | None
  prompt_token_ids: list
  token_ids: list
  text: str = ""
  metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _FakeSamplingParams:
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 128
  stop: tuple = ()
  seed: int = 0
  ignore_eos: bool = False


def default_factory(cfg: BenchConfig):
  """(make_llm(method, model, draft, profile) -> llm, SamplingParams class)."""
  if cfg.engine == "fake":
    def make(method, model, draft, profile):
      return FakeLLM(model=model, draft=draft, method=method, profile=profile,
                     fake_mismatch=cfg.fake_mismatch)
    return make, _FakeSamplingParams
  try:
    from ssd_jax import LLM, SamplingParams
  except ImportError:
    from ssd_jax.llm import LLM
    from ssd_jax.engine.sampling import SamplingParams

  def make(method, model, draft, profile):
    dd = cfg.draft_devices if method in cfg.draft_devices_for else 0
    return LLM(model=model, draft=None if method == "ar" else draft, method=method,
               mesh=cfg.mesh, draft_devices=dd, dtype=cfg.dtype, k=cfg.k, f=cfg.f,
               fanout_hit=list(cfg.fanout_hit) if cfg.fanout_hit else None,
               fanout_miss=list(cfg.fanout_miss) if cfg.fanout_miss else None,
               fallback=None if cfg.fallback == "auto" else cfg.fallback,
               sampler_x=cfg.sampler_x,
               max_batch_size=max(cfg.batch_sizes), max_model_len=cfg.max_model_len,
               attention_impl=cfg.attention_impl, profile=profile)
  return make, SamplingParams


# --------------------------------------------------------------------------- prompts

@dataclasses.dataclass
class Workload:
  name: str
  prompts: list           # str or list[int]
  chat: bool
  info: dict


def tokenizer_for(llm, model_path: str | None):
  tok = getattr(llm, "tokenizer", None)
  if tok is not None:
    return tok
  if model_path and os.path.isdir(model_path) and any(
      os.path.exists(os.path.join(model_path, f))
      for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    try:
      from transformers import AutoTokenizer
      return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001
      return None
  return None


def vocab_size_for(llm, model_path: str | None) -> int:
  c = model_config_of(llm, model_path, "model")
  if c is not None:
    return int(c.vocab_size)
  return int(getattr(llm, "vocab_size", 32000))


def build_workloads(cfg: BenchConfig, log) -> list[Workload]:
  out = []
  for name in cfg.datasets:
    try:
      ps = prompt_sets.load(name, cfg.numseqs)
    except prompt_sets.DatasetUnavailable as e:
      if len(cfg.datasets) > 1:
        log(f"[bench] WARNING: skipping dataset {name}: {e}")
        continue
      raise BenchError(str(e)) from None
    chat = {"auto": ps.chat, "on": True, "off": False}[cfg.chat_template]
    out.append(Workload(name, list(ps.prompts), chat, ps.describe()))
  if not out:
    raise BenchError("no dataset could be loaded")
  return out


def fix_lengths(workloads: list[Workload], length: int, tokenizer, vocab_size: int) -> None:
  """Turn every prompt into exactly `length` token ids (truncate, or repeat the text's
  tokens); without a tokenizer use ids derived from the bytes (random-weight models)."""
  for w in workloads:
    ids_list = []
    for p in w.prompts:
      if tokenizer is not None:
        ids = list(tokenizer.encode(p, add_special_tokens=False)) or [1]
        reps = -(-length // len(ids))
        ids = (ids * reps)[:length]
      else:
        ids = prompt_sets.synthetic_token_ids(p, length, vocab_size)
      ids_list.append(ids)
    w.prompts = ids_list
    w.chat = False
    w.info = dict(w.info, prompt_len=length,
                  tokenization="tokenizer" if tokenizer is not None else
                  "synthetic ids from the text's bytes (no tokenizer)")


# --------------------------------------------------------------------------- running

def _num(x):
  return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) \
      and math.isfinite(float(x)) else None


def _batches(items, bs):
  return [items[i:i + bs] for i in range(0, len(items), bs)]


def _call_decode_s(c: dict) -> float:
  """Decode time (prefill excluded) of one generate() call from the engine's metrics."""
  m = c["m"]
  rounds, rms = _num(m.get("num_rounds")), _num(m.get("round_ms"))
  if rounds and rms:
    return rounds * rms / 1e3
  dtps = _num(m.get("decode_tokens_per_s"))
  if dtps:
    return max(c["output_tokens"] - c["n"], 0) / dtps
  return c["wall_s"]


def _aggregate(calls: list[dict], batch_size: int) -> dict:
  """Combine the last_metrics of several generate() calls into one row.

  tokens_per_s: output tokens over the generate() wall time (the engine's definition;
  prefill included). decode_tokens_per_s: tokens after each sequence's first over the
  decode time (rounds x round time). round_ms: decode time per round of the batch.
  """
  out_tokens = sum(c["output_tokens"] for c in calls)
  n_seqs = sum(c["n"] for c in calls)
  wall_s = sum(_num(c["m"].get("wall_s")) or c["wall_s"] for c in calls)
  bench_wall_s = sum(c["wall_s"] for c in calls)
  decode_s = sum(_call_decode_s(c) for c in calls)
  rounds = sum(int(_num(c["m"].get("num_rounds")) or 0) for c in calls)

  def weighted(key):
    num = den = 0.0
    for c in calls:
      v = _num(c["m"].get(key))
      w = _num(c["m"].get("num_rounds")) or 1.0
      if v is not None:
        num += v * w
        den += w
    return num / den if den else None

  ttfts = [(_num(c["m"].get("ttft_s")), c["n"]) for c in calls]
  ttfts = [(t, n) for t, n in ttfts if t is not None]
  split: dict[str, float] = {}
  for c in calls:
    for key, v in (c["m"].get("time_split") or {}).items():
      if _num(v) is not None:
        split[key] = split.get(key, 0.0) + float(v)
  profiled = {}
  for key in sorted({k for c in calls for k in c["m"] if k.endswith("_round_ms")}):
    profiled[key] = weighted(key)
  comps = [_num(c["m"].get("compilations")) for c in calls]
  return {
      "batch_size": batch_size,
      "n_prompts": n_seqs,
      "n_calls": len(calls),
      "output_tokens": out_tokens,
      "wall_s": wall_s,
      "bench_wall_s": bench_wall_s,
      "decode_s": decode_s,
      "tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
      "decode_tokens_per_s": (out_tokens - n_seqs) / decode_s if decode_s > 0 else None,
      "ttft_s": (sum(t * n for t, n in ttfts) / sum(n for _, n in ttfts)) if ttfts else None,
      "num_rounds": rounds,
      "round_ms": 1e3 * decode_s / rounds if rounds else None,
      "mean_accepted": weighted("mean_accepted"),
      "cache_hit_rate": weighted("cache_hit_rate"),
      "compilations": int(sum(c for c in comps if c is not None)) if any(
          c is not None for c in comps) else None,
      "time_split": split or None,
      "profiled": profiled or None,
  }


def _split_per_round(split: dict | None, rounds: int | None) -> dict | None:
  if not split or not rounds:
    return None
  return {k.replace("_s", "_ms"): 1e3 * v / rounds for k, v in split.items()}


def first_mismatch(a: list, b: list) -> int | None:
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


class Runner:
  def __init__(self, cfg: BenchConfig, factory: Callable | None = None,
               sampling_cls=None, log=None):
    cfg.validate()
    self.cfg = cfg
    self.log = log or ((lambda *a: None) if cfg.quiet else
                       (lambda *a: print(*a, file=sys.stderr, flush=True)))
    if factory is None:
      factory, sampling_cls = default_factory(cfg)
    self.make_llm = factory
    self.SamplingParams = sampling_cls or _FakeSamplingParams
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
    env = {"python": platform.python_version(), "host": platform.node(),
           "engine": self.cfg.engine}
    for mod in ("jax", "flax", "transformers", "torch"):
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
    if cfg.bandwidth_gbps:
      self.report["roofline"]["bandwidth"] = {"bandwidth_Bps": cfg.bandwidth_gbps * 1e9,
                                              "source": "--bandwidth_gbps"}
    elif cfg.measure_bandwidth:
      try:
        bw = roofline.measure_copy_bandwidth()
        bw["source"] = "measured: jitted elementwise copy, read+write bytes / median time"
        self.report["roofline"]["bandwidth"] = bw
        self.log(f"[bench] copy bandwidth {bw['bandwidth_Bps'] / 1e9:.1f} GB/s on {bw['device']}")
      except Exception as e:  # noqa: BLE001
        self.warn(f"bandwidth measurement failed: {e!r}")
    if "jax" in sys.modules:
      try:
        import jax
        self.report["env"]["devices"] = [str(d) for d in jax.devices()]
        self.report["env"]["jax"] = jax.__version__
      except Exception:  # noqa: BLE001
        pass

  def _model_sizes(self, llm):
    rf = self.report["roofline"]
    for which, path in (("target", self.model_path), ("draft", self.draft_path)):
      if which in rf:
        continue
      c = model_config_of(llm, path, "model" if which == "target" else "draft")
      if c is not None:
        mb = roofline.model_bytes(c, self.cfg.dtype)
        rf[which] = dict(mb.to_dict(), dtype=self.cfg.dtype)

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
    wall = time.perf_counter() - t0
    m = dict(getattr(llm, "last_metrics", None) or {})
    return outs, m, wall

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
          "prompt_tokens": len(prompt_ids) if prompt_ids is not None else None,
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
    if cfg.prompt_len and workloads and isinstance(workloads[0].prompts[0], str):
      fix_lengths(workloads, cfg.prompt_len, tokenizer_for(llm, self.model_path),
                  vocab_size_for(llm, self.model_path))
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
        calls, mismatched, checked, ctx = [], 0, 0, []
        tokens_all = []
        reset = self._reset_prefix_cache(llm)
        for bi, batch in enumerate(_batches(w.prompts, bs)):
          outs, m, wall = self._generate(llm, batch, w.chat, cfg.output_len)
          n_out = sum(len(o.token_ids) for o in outs)
          cached = sum(int((getattr(o, "metrics", None) or {}).get("prompt_cached_tokens") or 0)
                       for o in outs)
          calls.append({"m": m, "wall_s": wall, "n": len(batch), "output_tokens": n_out,
                        "cached": cached})
          for j, (p, o) in enumerate(zip(batch, outs)):
            idx = bi * bs + j
            pids = getattr(o, "prompt_token_ids", None)
            if pids is not None:
              ctx.append(len(pids) + len(o.token_ids) / 2)
            if cfg.save_tokens:
              tokens_all.append(list(o.token_ids))
            if check:
              ok = self._check(method, w.name, bs, idx, p, o.token_ids, pids)
              if ok is not None:
                checked += 1
                mismatched += (not ok)
        row = _aggregate(calls, bs)
        row.update(method=method, dataset=w.name, load_s=load_s, warmup_s=warm_total,
                   engine_warmup_s=_num(warm_s), prefix_cache_reset=reset,
                   prompt_cached_tokens=sum(c["cached"] for c in calls),
                   compilations_per_call=[_num(c["m"].get("compilations")) for c in calls])
        if row["prompt_cached_tokens"]:
          self.warn(f"{method} {w.name} bs={bs}: {row['prompt_cached_tokens']} prompt tokens "
                    "came from the prefix cache (earlier runs of the same prompts): TTFT is "
                    "lower than for fresh prompts")
        row["time_split_per_round_ms"] = _split_per_round(row["time_split"], row["num_rounds"])
        row["time_split_source"] = "profiled runs (--profile)" if cfg.profile and row[
            "time_split"] else None
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
                 f"{_f(row['tokens_per_s'], '.1f')} tok/s  ttft {_f(row['ttft_s'], '.3f')}s  "
                 f"acc {_f(row['mean_accepted'], '.2f')}  hit {_f(row['cache_hit_rate'], '.2f')}")
        self.flush()
      if cfg.split_pass and not cfg.profile:
        self._split_pass(llm, method, bs, workloads)
    del llm
    gc.collect()

  @staticmethod
  def _reset_prefix_cache(llm) -> bool:
    """Forget cached prompt prefixes (the same prompts run again at each batch size);
    False if the engine has no way to."""
    for name in ("reset_prefix_cache", "clear_prefix_cache"):
      fn = getattr(llm, name, None)
      if callable(fn):
        fn()
        return True
    return False

  @staticmethod
  def _set_profile(llm, on: bool) -> bool:
    """Switch profiling on the engine (and its decoder) at run time; False if it can't."""
    done = False
    for obj in (llm, getattr(llm, "decoder", None)):
      if obj is not None and hasattr(obj, "profile"):
        try:
          obj.profile = on
          done = True
        except Exception:  # noqa: BLE001
          pass
    return done

  def _split_pass(self, llm, method, bs, workloads):
    """One extra profiled batch for the per-round time split (profile mode blocks at
    every round, so the timed numbers above stay unprofiled)."""
    w = workloads[0]
    if not self._set_profile(llm, True):
      return
    try:
      _, m, _ = self._generate(llm, w.prompts[:bs], w.chat,
                               self.cfg.split_pass_tokens or self.cfg.output_len)
    except Exception as e:  # noqa: BLE001
      self.warn(f"{method}: profiled split pass failed: {e!r}")
      return
    finally:
      self._set_profile(llm, False)
    split = {k: float(v) for k, v in (m.get("time_split") or {}).items()
             if _num(v) is not None}
    profiled = {k: _num(v) for k, v in m.items() if k.endswith("_round_ms")}
    rounds = int(_num(m.get("num_rounds")) or 0)
    if not split and not profiled:
      return
    src = f"separate profiled pass: {w.name}, first batch, {rounds} rounds"
    for row in self.report["results"]:
      if row["method"] == method and row["batch_size"] == bs:
        if split and not row["time_split"]:
          row["time_split"] = split
          row["time_split_per_round_ms"] = _split_per_round(split, rounds)
          row["time_split_source"] = src
        if profiled and not row.get("profiled"):
          row["profiled"] = profiled
          row["profiled_source"] = src
        row["split_pass_compilations"] = _num(m.get("compilations"))

  def _prompt_lengths(self, llm, workloads) -> list[int]:
    """Prompt lengths in tokens as the engine will see them (chat template included)."""
    lens = []
    tok = None
    for w in workloads:
      for p in w.prompts:
        if not isinstance(p, str):
          lens.append(len(p))
          continue
        if tok is None:
          tok = tokenizer_for(llm, self.model_path) or False
        if not tok:
          lens.append(len(p.encode("utf-8")))
          continue
        if w.chat and getattr(tok, "chat_template", None):
          try:
            ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
              ids = ids["input_ids"]
            lens.append(len(ids))
            continue
          except Exception:  # noqa: BLE001
            pass
        lens.append(len(tok.encode(p)))
    return lens or [1]

  @staticmethod
  def _page_size(llm) -> int:
    for obj in (getattr(llm, "blocks", None), getattr(llm, "target", None), llm):
      ps = getattr(obj, "page_size", None)
      if isinstance(ps, int) and ps > 0:
        return ps
    return 64

  def _warmup(self, llm, bs, workloads) -> float | None:
    """llm.warmup() for every shape the timed runs will use, so that they compile nothing:
    the batch size (and the last, partial batch), and one prompt length per combination
    of (power-of-two prompt bucket, power-of-two KV-page counts for prompt + max_new_tokens
    with and without speculation slack) -- the longest prompt of each -- with the timed
    runs' max_new_tokens. (Prefills of suffixes after cached prefix pages are warmed by
    llm.warmup() itself.)"""
    cfg = self.cfg
    page = self._page_size(llm)
    slack = 2 * (cfg.k + 1)
    pow2 = lambda n: 1 << max(0, (n - 1).bit_length())  # noqa: E731
    reps: dict[tuple, int] = {}
    for n in self._prompt_lengths(llm, workloads):
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
    total = 0.0
    for size, length in plan:
      total += _num(llm.warmup(size, length, max_new_tokens=cfg.output_len)) or 0.0
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
    spec = [r for r in rows if r["method"] != "ar"]
    if not (cfg.check_exact and cfg.temperature == 0.0):
      self.report["exactness"] = ("not checked: temperature > 0 (outputs match AR in "
                                  "distribution only)" if cfg.temperature > 0
                                  else "not checked (--nocheck_exact)")
    elif not any(r["method"] == "ar" for r in rows) and spec:
      self.report["exactness"] = "not checked: AR was not run (add ar to --methods)"
      self.warn(self.report["exactness"])
    elif self.report["mismatches"]:
      n = len(self.report["mismatches"])
      hint = (" (bfloat16: near-ties can flip an argmax between a K+1-token verify and a "
              "1-token step; rerun with --dtype float32 to tell a bug from rounding)"
              if cfg.dtype != "float32" else "")
      self.report["exactness"] = f"FAILED: {n} output(s) differ from AR{hint}"
    else:
      total = sum((r["exact_vs_ar"] or {}).get("checked", 0) for r in spec)
      self.report["exactness"] = f"ok: {total} SD/SSD outputs equal AR's token for token"
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
    from launch import plot as plotmod
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
    self.model_path, shape = resolve_model(cfg.model, cfg, 0, self.log)
    self.report["config"]["model_resolved"] = self.model_path
    self.report["config"]["model_shape"] = shape
    if any(m != "ar" for m in cfg.methods):
      self.draft_path, dshape = resolve_model(cfg.draft, cfg, 1, self.log)
      self.report["config"]["draft_resolved"] = self.draft_path
      self.report["config"]["draft_shape"] = dshape
    workloads = build_workloads(cfg, self.log)
    for w in workloads:
      self.report["datasets"][w.name] = w.info
    self._bandwidth()
    methods = sorted(cfg.methods, key=METHODS.index)  # AR first: the exactness reference
    for method in methods:
      try:
        self.run_method(method, workloads)
      except (KeyboardInterrupt, SystemExit):
        raise
      except Exception as e:  # noqa: BLE001 -- one method failing must not hide the others
        import traceback
        tb = traceback.format_exc()
        self.log(tb)
        self.report["errors"].append({"method": method, "error": f"{type(e).__name__}: {e}"[:2000],
                                      "traceback_tail": tb[-3000:]})
        self.log(f"[bench] !!! {method} FAILED: {type(e).__name__}: {str(e)[:500]}")
        gc.collect()
        self.flush()
    for w in workloads:  # prompt_len may have changed the info
      self.report["datasets"][w.name] = w.info
    return self.finish()


def _f(x, spec):
  return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------- table

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
  bw = (report.get("roofline") or {}).get("bandwidth") or {}
  if bw.get("bandwidth_Bps"):
    lines.append(f"copy bandwidth {bw['bandwidth_Bps'] / 1e9:.0f} GB/s; roofline = "
                 "floor ms / round ms (fewest bytes per round over that bandwidth)")
  lines.append(head)
  for r in rows:
    rf = r.get("roofline") or {}
    ex = r.get("exact_vs_ar")
    exact = "-" if ex is None else ("ok" if ex["mismatches"] == 0 else
                                    f"FAIL {ex['mismatches']}/{ex['checked']}")
    sp = r.get("speedup_over_ar")
    sp_s = ("n/a*" if report.get("random_weights") and r["method"] != "ar"
            else _f(sp, ".2f") + ("x" if sp is not None else ""))
    lines.append(
        f"{r['method']:<8}{r['dataset'][:12]:<13}{r['batch_size']:>3}"
        f"{_f(r.get('tokens_per_s'), '.1f'):>9}{_f(r.get('decode_tokens_per_s'), '.1f'):>10}"
        f"{sp_s:>9}"
        f"{_f(None if r.get('ttft_s') is None else 1e3 * r['ttft_s'], '.1f'):>9}"
        f"{_f(r.get('mean_accepted'), '.2f'):>8}{_f(r.get('cache_hit_rate'), '.2f'):>6}"
        f"{_f(r.get('round_ms'), '.2f'):>10}{_f(rf.get('round_floor_ms'), '.2f'):>10}"
        f"{_f(rf.get('achieved_fraction'), '.2f'):>9}"
        f"{_f(r.get('compilations'), 'd') if r.get('compilations') is not None else '-':>9}"
        f"  {exact}")
    sp = r.get("time_split_per_round_ms")
    if sp:
      lines.append("        split/round: " + "  ".join(f"{k} {v:.2f}" for k, v in sp.items()))
    pr = {k: v for k, v in (r.get("profiled") or {}).items() if v is not None}
    if pr:
      lines.append("        profiled: " + "  ".join(f"{k} {v:.2f}" for k, v in pr.items()))
  if report.get("random_weights"):
    lines.append("* random-weight timing: acceptance/hit rates are meaningless; "
                 "no speed-up is claimed")
  if report.get("exactness"):
    lines.append(f"exactness vs AR: {report['exactness']}")
  for e in report.get("errors") or []:
    lines.append(f"!!! {e['method']} FAILED: {e['error'][:300]}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _define_flags():
  from absl import flags
  F = flags
  F.DEFINE_string("model", None, "target: HF dir, .gguf, or (with --random_weights) a shape "
                  "name such as llama-3.1-8b; default: the engine's embedded model")
  F.DEFINE_string("draft", None, "draft model (same forms as --model)")
  F.DEFINE_list("methods", list(METHODS), "methods to run: ar,sd,ssd")
  F.DEFINE_enum("dataset", "humaneval", list(prompt_sets.DATASETS), "prompt set")
  F.DEFINE_bool("all", False, "run every prompt set (unavailable ones are skipped, loudly)")
  F.DEFINE_integer("numseqs", 8, "prompts per dataset (the first N)")
  F.DEFINE_integer("output_len", 128, "new tokens per prompt")
  F.DEFINE_list("batch_size", ["1"], "batch sizes, e.g. 1,8")
  F.DEFINE_integer("prompt_len", None, "make every prompt exactly this many token ids")
  F.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy, exactness checked)")
  F.DEFINE_integer("top_k", 0, "top-k (0: off)")
  F.DEFINE_float("top_p", 1.0, "top-p")
  F.DEFINE_integer("seed", 0, "sampling seed")
  F.DEFINE_bool("ignore_eos", True, "generate exactly --output_len tokens")
  F.DEFINE_integer("k", 7, "speculation length K")
  F.DEFINE_integer("f", 3, "SSD fan-out F")
  F.DEFINE_list("fanout_hit", None, "SSD fan-out list after a hit (K+1 ints)")
  F.DEFINE_list("fanout_miss", None, "SSD fan-out list after a miss (K+1 ints)")
  F.DEFINE_enum("fallback", "auto", ["auto", "jit", "fast"],
                "SSD miss fallback (auto: the engine's choice by batch size)")
  F.DEFINE_float("sampler_x", None, "Saguaro cache-aware sampling factor")
  F.DEFINE_string("mesh", "1x1", "target mesh, e.g. 1x4")
  F.DEFINE_integer("draft_devices", 0, "devices of the draft's own mesh (0: share target's)")
  F.DEFINE_list("draft_devices_for", ["ssd"], "methods that get --draft_devices")
  F.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
  F.DEFINE_integer("max_model_len", 2048, "engine max_model_len")
  F.DEFINE_string("attention_impl", "auto", "engine attention_impl")
  F.DEFINE_enum("chat_template", "auto", ["auto", "on", "off"],
                "auto: on for chat-style sets (alpaca_like)")
  F.DEFINE_bool("random_weights", False, "random-weight checkpoints: results are labelled "
                f"'{RANDOM_LABEL}' and no speed-up is claimed")
  F.DEFINE_string("ckpt_root", "/tmp/ssd_jax_random", "where --random_weights writes")
  F.DEFINE_bool("only_write_checkpoints", False, "write the random checkpoints, print their "
                "directories, and exit")
  F.DEFINE_bool("profile", False, "profile every run (time split; adds syncs)")
  F.DEFINE_bool("split_pass", True, "after the timed runs, one profiled batch per method "
                "for the time split (if the engine allows llm.profile at run time)")
  F.DEFINE_integer("split_pass_tokens", None, "tokens of the profiled split pass (default "
                   "--output_len: other lengths may compile new shapes)")
  F.DEFINE_bool("warmup_generate", False, "an untimed generate of the first batch after "
                "warmup() (primes the prefix cache with that batch)")
  F.DEFINE_bool("check_exact", True, "at temperature 0, check SD/SSD == AR")
  F.DEFINE_float("bandwidth_gbps", None, "skip the copy-bandwidth measurement; use this")
  F.DEFINE_bool("measure_bandwidth", True, "measure copy bandwidth for the roofline")
  F.DEFINE_enum("engine", "ssd_jax", ["ssd_jax", "fake"], "fake: harness dry run")
  F.DEFINE_list("fake_mismatch", [], "fake engine: corrupt these methods' outputs")
  F.DEFINE_string("output_json", None, "write the report here")
  F.DEFINE_string("plot", None, "write a PNG here (needs matplotlib)")
  F.DEFINE_string("peer_json", None, "include this peer_transformers JSON in the plot")
  F.DEFINE_bool("save_tokens", True, "keep generated token ids in the JSON")
  F.DEFINE_string("label", "", "free-form label for the report")
  return flags.FLAGS


def config_from_flags(FLAGS) -> BenchConfig:
  ints = lambda xs: tuple(int(x) for x in xs) if xs else None  # noqa: E731
  return BenchConfig(
      model=FLAGS.model, draft=FLAGS.draft, methods=tuple(m.strip().lower() for m in FLAGS.methods),
      datasets=tuple(prompt_sets.DATASETS) if FLAGS.all else (FLAGS.dataset,),
      numseqs=FLAGS.numseqs, output_len=FLAGS.output_len, batch_sizes=ints(FLAGS.batch_size),
      prompt_len=FLAGS.prompt_len, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos, k=FLAGS.k, f=FLAGS.f,
      fanout_hit=ints(FLAGS.fanout_hit), fanout_miss=ints(FLAGS.fanout_miss),
      fallback=FLAGS.fallback, sampler_x=FLAGS.sampler_x, mesh=FLAGS.mesh,
      draft_devices=FLAGS.draft_devices, draft_devices_for=tuple(FLAGS.draft_devices_for),
      dtype=FLAGS.dtype, max_model_len=FLAGS.max_model_len,
      attention_impl=FLAGS.attention_impl, chat_template=FLAGS.chat_template,
      random_weights=FLAGS.random_weights, ckpt_root=FLAGS.ckpt_root, profile=FLAGS.profile,
      split_pass=FLAGS.split_pass, split_pass_tokens=FLAGS.split_pass_tokens,
      warmup_generate=FLAGS.warmup_generate, check_exact=FLAGS.check_exact,
      bandwidth_gbps=FLAGS.bandwidth_gbps, measure_bandwidth=FLAGS.measure_bandwidth,
      engine=FLAGS.engine, fake_mismatch=tuple(FLAGS.fake_mismatch),
      output_json=FLAGS.output_json, plot=FLAGS.plot, peer_json=FLAGS.peer_json,
      save_tokens=FLAGS.save_tokens, label=FLAGS.label)


def _on_term(signum, frame):
  raise SystemExit(128 + signum)


def main(argv):
  del argv
  from absl import flags
  FLAGS = flags.FLAGS
  try:
    cfg = config_from_flags(FLAGS)
    cfg.validate()
    if FLAGS.only_write_checkpoints:
      if not cfg.random_weights:
        raise BenchError("--only_write_checkpoints needs --random_weights")
      runner_log = lambda *a: print(*a, flush=True)  # noqa: E731
      for name, seed in ((cfg.model, 0), (cfg.draft, 1)):
        if name:
          print(resolve_model(name, cfg, seed, runner_log)[0], flush=True)
      return 0
    runner = Runner(cfg)
  except BenchError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  signal.signal(signal.SIGTERM, _on_term)  # `timeout` kills: keep the partial JSON
  try:
    return runner.run()
  except BenchError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  finally:
    if runner.report.get("partial"):
      runner.report["warnings"].append("run did not finish: partial results")
      runner.flush()
      if runner.report["results"]:
        print(format_table(runner.report))


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
