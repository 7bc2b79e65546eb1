"""The user-facing engine: `LLM(...).generate(prompts, SamplingParams(...))`.

Reads like the pipeline it is: requests become `Sequence`s, the `Scheduler` admits them in
waves with their KV pages, a `DecodingMethod` (AR, SD or SSD) runs each wave on the model
runners, and outputs come back as `RequestOutput`s with per-request metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import time
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.checkpoint.cache import enable_compilation_cache
from ssd_jax.decoding.ar import ARMethod
from ssd_jax.engine.pages import PagePool
from ssd_jax.engine.loop import DecodingMethod
from ssd_jax.engine.runner import ModelRunner, compiler_options_for
from ssd_jax.engine.sampling import SamplingParams
from ssd_jax.engine.scheduler import Scheduler
from ssd_jax.engine.sequence import Sequence
from ssd_jax.kernels import resolve_impl
from ssd_jax.sharding.mesh import MeshSpec, check_model_fits, make_meshes

log = logging.getLogger("ssd_jax")

METHODS = ("ar", "sd", "ssd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class RequestOutput:
  prompt: str | None
  prompt_token_ids: list[int]
  token_ids: list[int]
  text: str
  finish_reason: str | None
  metrics: dict[str, Any]


def _default_dtype() -> str:
  return "bfloat16" if jax.default_backend() == "gpu" else "float32"


class LLM:
  """An exact decoder: AR, SD or SSD over a target (and a draft) on device meshes.

  model / draft: a HuggingFace directory, a .gguf file, None (the embedded
    SmolLM2-135M-Instruct; for `draft`: the bundled distilled draft when the target is the
    embedded default), or an already built `Transformer` (research use; pass `tokenizer`).
  mesh: "TxD" for the target (T-way tensor parallel x D replicas); draft_devices: devices
    after those for the draft's own mesh (0: the draft shares the target's devices).
  command_buffers: None (XLA's default), or a mode of runner.COMMAND_BUFFER_MODES
    ("off", "max") for how much of each program XLA records into CUDA graphs (GPU only).
  """

  def __init__(self, model=None, draft=None, *, method: str = "ar", mesh: str = "1x1",
               draft_devices: int = 0, dtype: str | None = None, k: int = 7, f: int = 3,
               fanout_hit: Seq[int] | None = None, fanout_miss: Seq[int] | None = None,
               fallback: str | None = None, sampler_x: float | None = None,
               draft_temperature: float | None = None, max_batch_size: int = 8,
               max_model_len: int = 2048, page_size: int = 64, num_pages: int | None = None,
               attention_impl: str = "auto", profile: bool = False, tokenizer=None,
               devices=None, command_buffers: str | None = None):
    if method not in METHODS:
      raise ValueError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    dtype = dtype or _default_dtype()
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    if k < 1:
      raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    self.method = method
    self.dtype = DTYPES[dtype]
    self.k = k
    self.profile = profile
    self.max_model_len = max_model_len
    # Compiled programs persist across runs (~/.cache/ssd_jax/xla; see checkpoint/cache.py).
    enable_compilation_cache()
    impl = resolve_impl(attention_impl)
    spec = MeshSpec.parse(mesh) if isinstance(mesh, str) else mesh
    if method == "ar" and draft_devices:
      raise ValueError("--draft-devices needs --method sd or ssd (AR has no draft)")
    self.target_mesh, self.draft_mesh = make_meshes(spec, draft_devices, devices)
    copts = compiler_options_for(command_buffers)

    self.target_model, self.tokenizer = self._load(model, self.target_mesh, impl, tokenizer,
                                                   "target")
    self.cfg = self.target_model.cfg
    pages_per_seq = -(-(max_model_len + 2 * (k + 1)) // page_size)
    num_pages = num_pages or max_batch_size * pages_per_seq + pages_per_seq
    self.target = ModelRunner(self.target_model, self.target_mesh, num_pages=num_pages,
                              page_size=page_size, name="target", compiler_options=copts)
    self.blocks = PagePool(num_pages, page_size)
    slack = k + 1 if method != "ar" else 0
    self.scheduler = Scheduler(self.blocks, max_batch_size, slack)
    eos = self.cfg.eos_token_ids or ((self.tokenizer.eos_token_id,)
                                     if self.tokenizer is not None
                                     and self.tokenizer.eos_token_id is not None else ())
    self.eos_ids = tuple(eos)
    decode = self._decode_text

    if method == "ar":
      self.decoding: DecodingMethod = ARMethod(self.target, decode, self.eos_ids)
      self.draft = None
      return
    if draft is None and model is None:
      from ssd_jax.checkpoint.default_draft import ensure_default_draft
      draft = ensure_default_draft()  # joined once from package data + the target
    elif draft is None:
      raise ValueError(f"--method {method} needs --draft (a draft model sharing the "
                       "target's tokenizer), or no --model to use the embedded pair")
    draft_mesh = self.draft_mesh or self.target_mesh
    draft_model, _ = self._load(draft, draft_mesh, impl, self.tokenizer, "draft")
    if draft_model.cfg.vocab_size != self.cfg.vocab_size:
      raise ValueError(f"draft vocab_size {draft_model.cfg.vocab_size} differs from the "
                       f"target's {self.cfg.vocab_size}: the draft must share the tokenizer")
    self.draft = ModelRunner(draft_model, draft_mesh, num_pages=num_pages,
                             page_size=page_size, name="draft", compiler_options=copts)
    from ssd_jax.decoding.sd import SDMethod, SpecOptions
    if method == "sd":
      self.decoding = SDMethod(self.target, self.draft,
                               SpecOptions(k=k, draft_temperature=draft_temperature),
                               decode, self.eos_ids)
    else:
      from ssd_jax.decoding.ssd import SSDMethod, SSDOptions
      opts = SSDOptions.build(k=k, f=f, fanout_hit=fanout_hit, fanout_miss=fanout_miss,
                              fallback=fallback or ("jit" if max_batch_size <= 4 else "fast"),
                              sampler_x=sampler_x, draft_temperature=draft_temperature)
      self.decoding = SSDMethod(self.target, self.draft, opts, decode, self.eos_ids)
    self.decoding.profile = profile

  # -- loading ----------------------------------------------------------------------------
  def _load(self, source, mesh, impl, tokenizer, role):
    from ssd_jax import checkpoint
    from ssd_jax.models.transformer import Transformer
    if isinstance(source, Transformer):
      check_model_fits(source.cfg, mesh, role)
      return source, tokenizer
    model, cfg = checkpoint.load_model(source, dtype=self.dtype, mesh=mesh,
                                       attention_impl=impl)
    check_model_fits(cfg, mesh, role)
    if tokenizer is None and role == "target":
      try:
        tokenizer = checkpoint.load_tokenizer(source)
      except checkpoint.CheckpointError as e:
        # Random-weight timing checkpoints have no tokenizer: token-id prompts still work.
        log.warning("no tokenizer (%s); only token-id prompts can be generated", e)
    return model, tokenizer

  def _decode_text(self, ids) -> str:
    if self.tokenizer is None:
      return " ".join(map(str, ids))
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  # -- generation -------------------------------------------------------------------------
  def _encode(self, prompt, chat_template: bool) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token ids instead")
      if chat_template:
        if not getattr(self.tokenizer, "chat_template", None):
          raise ValueError("chat_template=True but the model's tokenizer has no chat "
                           "template; pass chat_template=False")
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
          ids = ids["input_ids"]
        return list(ids)
      return list(self.tokenizer.encode(prompt))
    ids = [int(t) for t in prompt]
    if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
    return ids

  def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
               *, chat_template: bool = False, progress: bool = False) -> list[RequestOutput]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    if not prompts:
      return []
    params = params or SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
      raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    seqs = []
    now = time.perf_counter()
    # generate() is synchronous: anything still queued is left over from a call that
    # failed part-way (e.g. a request that could never fit), not work to resume.
    self.scheduler.waiting.clear()
    for prompt, p in zip(prompts, plist):
      ids = self._encode(prompt, chat_template)
      if not ids:
        raise ValueError("a prompt is empty: it must contain at least one token")
      if len(ids) + p.max_new_tokens > self.max_model_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                         f"exceeds max_model_len={self.max_model_len}; raise max_model_len")
      seq = Sequence(prompt_token_ids=ids, params=p,
                     prompt=prompt if isinstance(prompt, str) else None, t_arrival=now)
      self.scheduler.add(seq)
      seqs.append(seq)
    total_new = sum(p.max_new_tokens for p in plist)
    bar = _Progress(total_new) if progress else None
    compiles0 = self.decoding.num_compilations()
    totals = {"rounds": 0, "decode_s": 0.0, "prefill_s": 0.0, "waves": 0}
    self.decoding.round_times = []
    self.decoding.phase_times = collections.defaultdict(list)
    done_before = 0
    t0 = time.perf_counter()
    while (wave := self.scheduler.next_wave()) is not None:
      def on_progress(n, base=done_before):
        if bar:
          bar.update(base + n)
      try:
        stats = self.decoding.run_wave(wave, on_progress)
      finally:
        self.scheduler.finish_wave(wave)
      done_before += sum(len(s.output_token_ids) for s in wave.seqs)
      totals["rounds"] += stats.rounds
      totals["decode_s"] += stats.decode_s
      totals["prefill_s"] += stats.prefill_s
      totals["waves"] += 1
    wall = time.perf_counter() - t0
    if bar:
      bar.close()
    outs = [self._output(s) for s in seqs]
    n_out = sum(len(o.token_ids) for o in outs)
    rounds = sum(s.num_rounds for s in seqs)
    lookups = sum(s.num_lookups for s in seqs)
    self.last_metrics = {
        "method": self.method,
        "num_requests": len(seqs),
        "output_tokens": n_out,
        "wall_s": wall,
        "tokens_per_s": n_out / wall if wall > 0 else 0.0,
        "decode_tokens_per_s": (n_out - len(seqs)) / totals["decode_s"]
        if totals["decode_s"] > 0 else 0.0,
        "ttft_s": float(np.mean([o.metrics["ttft_s"] for o in outs])),
        "num_rounds": totals["rounds"],
        "round_ms": 1e3 * totals["decode_s"] / max(totals["rounds"], 1),
        "mean_accepted": (sum(s.num_accepted for s in seqs) / rounds) if rounds else None,
        "cache_hit_rate": (sum(s.num_hits for s in seqs) / lookups) if lookups else None,
        "compilations": self.decoding.num_compilations() - compiles0,
        "total_compilations": self.decoding.num_compilations(),
    }
    if self.method == "ar":
      self.last_metrics["mean_accepted"] = None
    if self.decoding.round_times or self.decoding.phase_times:
      self.last_metrics.update(self.decoding.profile_summary())
    return outs

  def _output(self, s: Sequence) -> RequestOutput:
    ids = s.output_token_ids
    text = self._decode_text(ids)
    for stop in s.params.stop:  # cut the text before a stop string
      if stop in text:
        text = text[:text.index(stop)]
    decode_tokens = max(len(ids) - 1, 0)
    decode_s = (s.t_finish or s.t_first_token) - s.t_first_token
    m = {
        "ttft_s": s.t_first_token - s.t_arrival,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "num_rounds": s.num_rounds,
        "prompt_cached_tokens": s.num_cached_tokens,
    }
    if self.method != "ar":
      m["mean_accepted"] = s.num_accepted / s.num_rounds if s.num_rounds else None
    if self.method == "ssd":
      m["cache_hit_rate"] = s.num_hits / s.num_lookups if s.num_lookups else None
    return RequestOutput(prompt=s.prompt, prompt_token_ids=s.prompt_token_ids,
                         token_ids=list(ids), text=text, finish_reason=s.finish_reason,
                         metrics=m)

  def reset_prefix_cache(self) -> None:
    """Forget cached prompt pages (e.g. between benchmark runs of the same prompts)."""
    self.blocks.drop_cached()

  def warmup(self, batch_size: int = 1, prompt_len: int = 16, max_new_tokens: int = 8) -> float:
    """Compile the programs for these shapes (a throwaway generate, then the prefills of
    shorter suffixes after a cached prefix); returns seconds."""
    t0 = time.perf_counter()
    ids = [[1 + (i % max(self.cfg.vocab_size - 1, 1)) for i in range(prompt_len)]
           for _ in range(batch_size)]
    self.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    # Later prompts that share cached prefix pages prefill shorter suffixes: compile those.
    for runner in (self.target, getattr(self, "draft", None)):
      if runner is not None:
        runner.warm_prefill_buckets()
    return time.perf_counter() - t0


class _Progress:
  """A one-line progress display on stderr (tokens generated / budget)."""

  def __init__(self, total: int):
    self.total = total
    self.t0 = time.perf_counter()
    self.last = 0.0

  def update(self, n: int) -> None:
    now = time.perf_counter()
    if now - self.last < 0.5:
      return
    self.last = now
    rate = n / max(now - self.t0, 1e-9)
    sys.stderr.write(f"\r  generated {n}/{self.total} tokens  {rate:7.1f} tok/s")
    sys.stderr.flush()

  def close(self) -> None:
    sys.stderr.write("\n")
