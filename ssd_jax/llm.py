"""The user-facing engine: `LLM(...).generate(prompts, SamplingParams(...))`.

Reads like the pipeline it is: requests become `Sequence`s, the `Scheduler` lets them join
and leave the running batch between rounds with their KV pages, a `DecodingMethod` (AR,
SD or SSD) runs the rounds on the model runners, and outputs come back as
`RequestOutput`s with per-request metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import sys
import time
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.checkpoint.cache import enable_compilation_cache
from ssd_jax.decoding.ar import ARMethod
from ssd_jax.engine.pages import PagePool
from ssd_jax.engine import warmup
from ssd_jax.engine.loop import DecodingMethod
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import ModelRunner, compiler_options_for
from ssd_jax.engine.sampling import SamplingParams, as_float
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


def _int_arg(name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _is_token_id(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _normalize_prompts(prompts) -> list:
  """generate()'s prompts as a list of str / list[int], or a one-line TypeError/ValueError
  saying what is wrong. Accepts a string, a list of token ids, a list of those (mixed),
  and integer numpy arrays (1-D: one prompt, 2-D: one per row)."""
  what = "prompts must be a string, a list of token ids, or a list of those"
  if isinstance(prompts, np.ndarray):
    if prompts.ndim not in (1, 2) or not np.issubdtype(prompts.dtype, np.integer):
      raise TypeError(f"{what}; got a {prompts.ndim}-D {prompts.dtype} array (token-id "
                      "arrays must be 1-D or 2-D integers)")
    return [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
  if isinstance(prompts, str):
    prompts = [prompts]
  elif isinstance(prompts, (bytes, bytearray)):
    raise TypeError("prompts are bytes; decode them to str (UTF-8) first")
  elif not isinstance(prompts, (list, tuple)):
    raise TypeError(f"{what}; got {type(prompts).__name__}")
  elif prompts and isinstance(prompts[0], (numbers.Number, np.generic)):
    prompts = [prompts]  # one prompt of token ids
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      try:
        p.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ValueError(f"prompt {i} is not valid text: character {e.start} is an "
                         "undecodable byte (lone surrogate); pass UTF-8 text") from None
      out.append(p)
      continue
    if isinstance(p, np.ndarray) and p.ndim == 1:
      p = p.tolist() if np.issubdtype(p.dtype, np.integer) else list(p)
    if not isinstance(p, (list, tuple)):
      raise TypeError(f"prompt {i} is {type(p).__name__}: a prompt is a string or a list "
                      "of token ids")
    for j, t in enumerate(p):
      if not _is_token_id(t):
        raise TypeError(f"prompt {i}: token id {t!r} at position {j} is not an integer; "
                        "token ids must be ints")
    out.append([int(t) for t in p])
  return out


def _default_dtype() -> str:
  return "bfloat16" if jax.default_backend() == "gpu" else "float32"


class LLM:
  """An exact decoder: AR, SD or SSD over a target (and a draft) on device meshes.

  model / draft: a HuggingFace directory, a .gguf file, None (the embedded
    SmolLM2-135M-Instruct; for `draft`: the bundled distilled draft when the target is the
    embedded default), or an already built `Transformer` (research use; pass `tokenizer`;
    its attention kernels are set to `attention_impl`).
  mesh: "TxD" for the target (T-way tensor parallel x D replicas); draft_devices: devices
    after those for the draft's own mesh (0: the draft shares the target's devices).
  command_buffers: None (XLA's default), or a mode of runner.COMMAND_BUFFER_MODES
    ("off", "max") for how much of each program XLA records into CUDA graphs (GPU only).
  ar_steps: AR decode steps per round (one program, stops applied on device each step).
    None: 4 for a target of under 1 GB of weights, whose step is bound by the host's
    dispatch (one H200: a 135M-shape step 2.14 -> 1.17 ms), else 1 (an 8B-shape step
    4.74 -> 5.01 ms with 4; bench/RESULTS.md).
  min_step_rows: steps of fewer tokens are padded to this many rows (None: 8 on GPU, where
    single-row GEMMs are slow, 1 elsewhere; runner.ModelRunner).
  matmul_impl: how decode-sized steps compute the layers' weight products: "xla", or
    "pallas" / "auto" for `kernels.fused_matmul` (norms, activation and residual adds
    inside the products' kernels; unsharded meshes only). See Transformer.set_matmul_impl.
  """

  def __init__(self, model=None, draft=None, *, method: str = "ar", mesh: str = "1x1",
               draft_devices: int = 0, dtype: str | None = None, k: int = 7, f: int = 3,
               fanout_hit: Seq[int] | None = None, fanout_miss: Seq[int] | None = None,
               fallback: str | None = None, sampler_x: float | None = None,
               draft_temperature: float | None = None, max_batch_size: int = 8,
               max_model_len: int = 2048, page_size: int = 64, num_pages: int | None = None,
               attention_impl: str = "auto", profile: bool = False, tokenizer=None,
               devices=None, command_buffers: str | None = None,
               min_step_rows: int | None = None, ar_steps: int | None = None,
               matmul_impl: str = "xla"):
    if method not in METHODS:
      raise ValueError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    dtype = dtype or _default_dtype()
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    # Every option is checked here, before any model loads (seconds for a real one).
    k = _int_arg("k (draft tokens per round)", k, 1)
    max_batch_size = _int_arg("max_batch_size", max_batch_size, 1)
    max_model_len = _int_arg("max_model_len", max_model_len, 2)
    page_size = _int_arg("page_size", page_size, 1)
    num_pages = None if num_pages is None else _int_arg("num_pages", num_pages, 1)
    draft_devices = _int_arg("draft_devices", draft_devices, 0)
    f = _int_arg("f (fan-out per acceptance length)", f, 0)
    ar_steps = None if ar_steps is None else _int_arg("ar_steps", ar_steps, 1)
    min_step_rows = None if min_step_rows is None else _int_arg("min_step_rows",
                                                                min_step_rows, 1)
    if draft_temperature is not None:
      draft_temperature = as_float("draft_temperature", draft_temperature)
      if draft_temperature < 0:
        raise ValueError(f"draft_temperature must be >= 0, got {draft_temperature}")
    if method == "ar" and draft is not None:
      raise ValueError("a draft model needs method sd or ssd (AR has no draft)")
    from ssd_jax.decoding.ssd import SSDOptions
    ssd_opts = SSDOptions.build(k=k, f=f, fanout_hit=fanout_hit, fanout_miss=fanout_miss,
                                fallback=fallback or ("jit" if max_batch_size <= 4 else "fast"),
                                sampler_x=sampler_x, draft_temperature=draft_temperature)
    from ssd_jax.checkpoint.loader import check_source
    for role, source in (("", model), ("draft ", draft)):  # fail now, not after a load
      if isinstance(source, (str, os.PathLike)):
        try:
          check_source(source)
        except ValueError as e:
          raise type(e)(f"{role}{e}") from None
    self.method = method
    self.dtype = DTYPES[dtype]
    self.k = k
    self.profile = profile  # time every round (engine/observe.py)
    self.trace_host = False  # time every host dispatch of a round (engine/observe.py)
    self.max_model_len = max_model_len
    # Compiled programs persist across runs (~/.cache/ssd_jax/xla; see checkpoint/cache.py).
    enable_compilation_cache()
    impl = resolve_impl(attention_impl)
    resolve_impl(matmul_impl, "matmul_impl")  # fails now on an unknown name
    self.matmul_impl = matmul_impl
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
                              page_size=page_size, name="target", compiler_options=copts,
                              min_rows=min_step_rows)
    self.blocks = PagePool(num_pages, page_size)
    self.max_batch_size = max_batch_size
    eos = self.cfg.eos_token_ids or ((self.tokenizer.eos_token_id,)
                                     if self.tokenizer is not None
                                     and self.tokenizer.eos_token_id is not None else ())
    self.eos_ids = tuple(eos)
    decode = self._decode_text

    if method == "ar":
      if ar_steps is None:
        weight_bytes = sum(x.nbytes for x in self.target.params)
        ar_steps = 4 if weight_bytes < 1e9 else 1
      self.decoding: DecodingMethod = ARMethod(self.target, decode, self.eos_ids,
                                               steps=ar_steps)
      self.draft = None
      self._make_scheduler()
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
                             page_size=page_size, name="draft", compiler_options=copts,
                             min_rows=min_step_rows)
    from ssd_jax.decoding.sd import SDMethod, SpecOptions
    if method == "sd":
      self.decoding = SDMethod(self.target, self.draft,
                               SpecOptions(k=k, draft_temperature=draft_temperature),
                               decode, self.eos_ids)
    else:
      from ssd_jax.decoding.ssd import SSDMethod
      self.decoding = SSDMethod(self.target, self.draft, ssd_opts, decode, self.eos_ids)
    self._make_scheduler()

  def _make_scheduler(self) -> None:
    d = self.decoding
    self.scheduler = Scheduler(self.blocks, self.max_batch_size, d.slack_tokens,
                               round_tokens=d.round_tokens, lag=d.lag)

  # -- loading ----------------------------------------------------------------------------
  def _load(self, source, mesh, impl, tokenizer, role):
    from ssd_jax import checkpoint
    from ssd_jax.models.transformer import Transformer
    if isinstance(source, Transformer):
      check_model_fits(source.cfg, mesh, role)
      # attention_impl governs a model built elsewhere too (random_model builds with
      # "xla"): left as built, a GPU benchmark of a random-weight model silently timed
      # XLA's attention where every loaded model runs the Pallas kernels.
      source.set_attention_impl(impl)
      source.set_matmul_impl(self.matmul_impl)
      return source, tokenizer
    model, cfg = checkpoint.load_model(source, dtype=self.dtype, mesh=mesh,
                                       attention_impl=impl)
    model.set_matmul_impl(self.matmul_impl)
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
  def encode(self, prompt, chat_template: bool = False) -> list[int]:
    """The token ids generate() runs for `prompt` (text through the tokenizer and, with
    chat_template, the chat template; token ids checked against the vocabulary)."""
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
    bad = [t for t in ids if t < 0 or t >= self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got {bad[0]}")
    return ids

  def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
               *, chat_template: bool = False, progress: bool = False,
               on_tokens=None, observer: RoundObserver | None = None) -> list[RequestOutput]:
    """Generates for every prompt (a string, or a list of token ids) and returns one
    RequestOutput per prompt, in order; they are also kept in `self.last_outputs`.

    on_tokens: None, or one callable (or None) per prompt, set as that request's
    `Sequence.on_tokens` (streaming and abort; engine/stream.py, serve/engine.py).
    observer: a RoundObserver (engine/observe.py) to use instead of the one built from
    `profile`/`trace_host`, e.g. one that records every round's accepted/hit per row.

    On KeyboardInterrupt (Ctrl-C; the CLI raises one for SIGTERM as well) the work that
    finished is not lost: the exception is re-raised with `.outputs`, a list in prompt
    order holding the RequestOutput of every request that had finished and None for the
    others (the same list is `self.last_outputs`), and the engine stays usable."""
    seqs: list[Sequence] = []
    try:
      outs = self._generate(prompts, params, chat_template, progress, seqs, on_tokens,
                            observer)
    except KeyboardInterrupt as e:
      if progress:
        sys.stderr.write("\n")  # end the progress line
      e.outputs = self._keep_finished(seqs)
      raise
    self.last_outputs = outs
    return outs

  def _keep_finished(self, seqs: list[Sequence]) -> list[RequestOutput | None]:
    """After an interruption: the outputs of the sequences that finished, and an engine
    that can run again (no job of the decoder still running, no pages held)."""
    self.recover()
    self.last_outputs = [self._output(s) if s.is_finished else None for s in seqs]
    return self.last_outputs

  def recover(self) -> None:
    """After a run was interrupted or failed: no job of the decoder still running, no
    sequence queued or holding pages, and a KV pool to run on."""
    try:
      self.decoding.finish()  # SSD's draft thread may be dispatching a job
    except BaseException:  # its error, if any, does not matter any more
      pass
    self.scheduler.abort_all()
    runners = (self.target, self.draft) if self.draft is not None else (self.target,)
    if any([r.restore_kv() for r in runners]):
      self.blocks.drop_cached()  # the cached prefixes' KV went with the lost pool

  def serve(self, poll, observer: RoundObserver | None = None) -> None:
    """Run the host loop until poll(idle=True) returns False (serve/engine.py): poll
    queues new sequences into `self.scheduler` (make_sequence, then scheduler.add)
    between rounds; they join the running batch as rows and pages allow."""
    obs = observer or RoundObserver(profile=self.profile, trace_host=self.trace_host)
    self.decoding.run(self.scheduler, obs=obs, poll=poll)

  def _generate(self, prompts, params, chat_template: bool, progress: bool,
                seqs: list[Sequence], on_tokens=None,
                observer: RoundObserver | None = None) -> list[RequestOutput]:
    prompts = _normalize_prompts(prompts)
    if not prompts:
      return []
    params = SamplingParams() if params is None else params
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
      raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
    for p in plist:
      if not isinstance(p, SamplingParams):
        raise TypeError(f"params must be a SamplingParams or a list of them, got "
                        f"{type(p).__name__}")
    hooks = [None] * len(prompts) if on_tokens is None else list(on_tokens)
    if len(hooks) != len(prompts):
      raise ValueError(f"{len(hooks)} on_tokens callbacks for {len(prompts)} prompts")
    now = time.perf_counter()
    # generate() is synchronous: anything still queued is left over from a call that
    # failed part-way (e.g. a request that could never fit), not work to resume.
    self.scheduler.abort_all()
    for prompt, p, hook in zip(prompts, plist, hooks):
      ids = self.encode(prompt, chat_template)
      seq = self.make_sequence(ids, p, prompt if isinstance(prompt, str) else None, now)
      seq.on_tokens = hook
      seqs.append(seq)
    for seq in seqs:
      self.scheduler.add(seq)
    total_new = sum(p.max_new_tokens for p in plist)
    bar = _Progress(total_new) if progress else None
    compiles0 = self.decoding.num_compilations()
    obs = observer or RoundObserver(profile=self.profile, trace_host=self.trace_host)
    t0 = time.perf_counter()
    stats = self.decoding.run(self.scheduler, bar.update if bar else None, obs)
    totals = {"rounds": stats.rounds, "decode_s": stats.decode_s,
              "prefill_s": stats.prefill_s}
    wall = time.perf_counter() - t0
    if bar:
      bar.close(sum(len(s.output_token_ids) for s in seqs))
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
        "preemptions": stats.preemptions,
        "total_compilations": self.decoding.num_compilations(),
    }
    if self.method == "ar":
      self.last_metrics["mean_accepted"] = None
    self.last_metrics.update(obs.summary())
    return outs

  def make_sequence(self, ids: list[int], params: SamplingParams, prompt: str | None = None,
                    t_arrival: float | None = None) -> Sequence:
    """A request as the scheduler takes it, checked: raises ValueError (one line) for an
    empty prompt or one that does not fit max_model_len with its max_new_tokens."""
    if not ids:
      raise ValueError("a prompt is empty: it must contain at least one token")
    if len(ids) + params.max_new_tokens > self.max_model_len:
      raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                       f"exceeds max_model_len={self.max_model_len}; raise max_model_len")
    return Sequence(prompt_token_ids=list(ids), params=params, prompt=prompt,
                    t_arrival=time.perf_counter() if t_arrival is None else t_arrival)

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

  def shape_buckets(self) -> dict:
    """The shapes this engine compiles programs for; every request lands in one of them.

    batch:          the running batch's rows (and a batch update's joiners), a power of
                    two up to bucket(max_batch_size);
    table_widths:   its page-table width (pages per row), a power of two from the
                    smallest reservation's (prompt 1 + 1 token + speculation slack) to the
                    largest's (max_model_len + slack, at most num_pages);
    prefill_tokens: per table width, the tokens one prefill takes (the prompt, or its
                    suffix after cached prefix pages): powers of two >= 16, up to the
                    longest prompt that fits that width (and max_model_len - 1);
    sampling:       all-greedy batches and batches that sample compile apart.

    `programs` counts what warmup(all_buckets=True) compiles (engine/warmup.py)."""
    return warmup.shape_buckets(self)

  def warmup(self, batch_size: int = 1, prompt_len: int = 16, max_new_tokens: int = 8, *,
             all_buckets: bool = False, progress: bool = False) -> float:
    """Compile the programs for these shapes (a throwaway generate, then the prefills of
    shorter suffixes after a cached prefix); returns seconds.

    all_buckets=True compiles every program of every bucket of `shape_buckets()` instead
    (the other arguments are then unused), so that no later request compiles anything,
    whatever its batch, lengths or sampling: what a long-lived engine needs. That is
    `shape_buckets()["programs"]` compilations; progress=True reports them on stderr with
    the time left (estimated from those done so far)."""
    if all_buckets:
      return warmup.warm_all_buckets(self, progress)
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

  def update(self, n: int, end: str = "") -> None:
    now = time.perf_counter()
    if now - self.last < 0.5 and not end:
      return
    self.last = now
    rate = n / max(now - self.t0, 1e-9)
    sys.stderr.write(f"\r  generated {n}/{self.total} tokens  {rate:7.1f} tok/s{end}")
    sys.stderr.flush()

  def close(self, n: int) -> None:
    """The final count (updates are throttled, so the last one shown may be older)."""
    self.update(n, "  done" + (" (requests stopped before their max_new_tokens)"
                               if n < self.total else "") + "\n")
