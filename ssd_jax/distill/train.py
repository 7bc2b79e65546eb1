"""Draft distillation: loss, train step, loop with orbax checkpoint/resume, and evaluation.

The draft learns the target's next-token distributions under teacher forcing: the loss is
KL(target || draft) per position, with the target's logits computed on the fly in the same
jitted step (the target is frozen; its forward costs about as much as the draft's forward
and backward together for a 4-layer draft of a 30-layer target, and needs no storage).

Both models run through the engine's own decoder. A plain causal forward over [B, T]
tokens is the paged forward with one page of T slots per sequence: slot b*T + t for token
t of row b, and kv_limit = t + 1, which is exactly causal attention (`causal_forward`).

Evaluation: held-out KL and top-1 agreement, and the greedy acceptance estimate for
speculative decoding: for each prompt the target generates a greedy continuation; a draft
proposing K tokens from position j has them accepted up to its first disagreement with that
continuation, so one teacher-forced draft forward over prompt+continuation gives every
round's accepted length (`simulate_acceptance`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssd_jax.models.transformer import AttentionInputs, Transformer, init_kv_cache


# --- forward passes ---------------------------------------------------------------------

def causal_forward(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Float32 logits [B, T, V] of plain causal LM over tokens [B, T] (positions 0..T-1)."""
  b, t = tokens.shape
  dtype = model.embed_tokens[...].dtype
  kv = init_kv_cache(model.cfg, num_pages=b, page_size=t, dtype=dtype)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  attn = AttentionInputs(page_table=rows, slot_mapping=rows * t + pos, kv_limit=pos + 1)
  logits, _, _ = model(tokens, pos, kv, attn)
  return logits


class Functional:
  """A model as (static graph, named parameter arrays): what jit and optax want.

  `params` maps dotted names ('layers.0.mlp.gate_up_proj') to arrays; `bind(params)` rebuilds
  the module inside a traced function.
  """

  def __init__(self, model: nnx.Module):
    self.graphdef, pstate, self.rest = nnx.split(model, nnx.Param, ...)
    flat = list(nnx.to_flat_state(pstate))
    leaves, self.treedef = jax.tree_util.tree_flatten(pstate)
    if len(leaves) != len(flat) or any(a is not v[...] for a, (_, v) in zip(leaves, flat)):
      raise RuntimeError("parameter order of the model's state is not its flat order")
    self.names = [".".join(str(k) for k in p) for p, _ in flat]
    self.params = dict(zip(self.names, leaves))
    self.cfg = model.cfg

  def bind(self, params: dict) -> nnx.Module:
    state = jax.tree_util.tree_unflatten(self.treedef, [params[n] for n in self.names])
    return nnx.merge(self.graphdef, state, self.rest)


def kl_and_agreement(t_logits, d_logits, mask=None):
  """Mean KL(target || draft) over positions, and top-1 agreement (both float32 scalars)."""
  lt = jax.nn.log_softmax(t_logits.astype(jnp.float32), axis=-1)
  ld = jax.nn.log_softmax(d_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(lt) * (lt - ld), axis=-1)
  agree = (jnp.argmax(t_logits, -1) == jnp.argmax(d_logits, -1)).astype(jnp.float32)
  if mask is None:
    return jnp.mean(kl), jnp.mean(agree)
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  return jnp.sum(kl * m) / n, jnp.sum(agree * m) / n


# --- training ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # 0: as many as fit time_budget_s (fixed after calib_steps)
  lr: float = 1e-3
  warmup_steps: int = 50
  end_lr_frac: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  freeze_embeddings: bool = True
  compute_dtype: str = "float32"  # "bfloat16": draft weights are cast per step (f32 master)
  log_every: int = 10
  ckpt_every: int = 0  # 0: no periodic checkpoints
  calib_steps: int = 10  # with steps=0: steps timed before the run length is fixed
  seed: int = 0


def lr_at(tc: TrainConfig, step: int, total: int) -> float:
  """Linear warmup to tc.lr, then cosine decay to tc.lr * end_lr_frac at `total` steps.

  Computed on the host and passed to the step, so the run length is no compile-time
  constant (it can be fixed from a time budget after the step is compiled and timed).
  """
  w = max(tc.warmup_steps, 1)
  if step < w:
    return tc.lr * (step + 1) / w
  frac = min(max(step - w, 0) / max(total - w, 1), 1.0)
  return tc.lr * (tc.end_lr_frac + (1 - tc.end_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW without its learning rate (clip -> Adam -> decoupled weight decay); the step
  applies -lr * update with the host-computed lr."""
  decay_mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}  # no decay on norms
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.scale_by_adam(b1=tc.b1, b2=tc.b2),
                     optax.add_decayed_weights(tc.weight_decay, mask=decay_mask))


def is_trainable(name: str, freeze_embeddings: bool) -> bool:
  return not (freeze_embeddings and name == "embed_tokens")


_STEP_CACHE: dict = {}


def _compiled_steps(target: Functional, draft: Functional, train_names: tuple, tc: TrainConfig):
  """(optimizer, jitted train step, jitted eval step), shared by equal setups.

  Keyed on both models' graph definitions and the train config, so a second Distiller of
  the same shapes (a resumed run, a test) reuses the compiled steps.
  """
  opt_fields = (tc.weight_decay, tc.clip_norm, tc.b1, tc.b2, tc.compute_dtype)
  key = (target.graphdef, target.treedef, tuple(target.names), draft.graphdef, draft.treedef,
         tuple(draft.names), train_names, opt_fields)
  if key in _STEP_CACHE:
    return _STEP_CACHE[key]
  tx = make_optimizer(tc)
  cdt = jnp.dtype(tc.compute_dtype)

  def draft_logits(params, frozen, tokens):
    p = {k: v.astype(cdt) for k, v in params.items()}
    p.update(frozen)
    return causal_forward(draft.bind(p), tokens)

  def step_fn(params, opt_state, frozen, target_params, tokens, lr):
    t_logits = jax.lax.stop_gradient(causal_forward(target.bind(target_params), tokens))

    def loss_fn(p):
      return kl_and_agreement(t_logits, draft_logits(p, frozen, tokens))

    (loss, agree), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                         for g in jax.tree.leaves(grads)))
    return params, opt_state, {"loss": loss, "top1": agree, "grad_norm": gnorm}

  def eval_fn(params, frozen, target_params, tokens):
    t_logits = causal_forward(target.bind(target_params), tokens)
    return kl_and_agreement(t_logits, draft_logits(params, frozen, tokens))

  out = (tx, jax.jit(step_fn, donate_argnums=(0, 1)), jax.jit(eval_fn))
  _STEP_CACHE[key] = out
  return out


class Distiller:
  """Owns the draft's trainable/frozen parameters, the optimizer and the jitted steps."""

  def __init__(self, target: Transformer, draft: Transformer, tc: TrainConfig):
    self.tc = tc
    self.target = Functional(target)
    self.draft = Functional(draft)
    self.train_names = [n for n in self.draft.names if is_trainable(n, tc.freeze_embeddings)]
    # Copies: the draft may share buffers with the target (init from it), and the train
    # step donates its parameters.
    self.params = {n: jnp.array(self.draft.params[n], jnp.float32, copy=True)
                   for n in self.train_names}
    cdt = jnp.dtype(tc.compute_dtype)
    self.frozen = {n: v.astype(cdt) for n, v in self.draft.params.items()
                   if n not in self.params}
    self.tx, self._train_step, self._eval_step = _compiled_steps(
        self.target, self.draft, tuple(self.train_names), tc)
    self.opt_state = self.tx.init(self.params)
    # Committed to one device, as orbax restores them: a resumed run then hits the same
    # compiled step instead of compiling it again.
    dev = jax.devices()[0]
    self.params, self.opt_state, self.frozen = jax.device_put(
        (self.params, self.opt_state, self.frozen), dev)
    self.step = 0
    self.total_steps = tc.steps or None  # None: fixed by train_loop from its time budget

  def train_step(self, tokens: np.ndarray) -> dict:
    lr = lr_at(self.tc, self.step, self.total_steps or 10**9)
    self.params, self.opt_state, m = self._train_step(
        self.params, self.opt_state, self.frozen, self.target.params, jnp.asarray(tokens),
        jnp.float32(lr))
    self.step += 1
    m = dict(m)
    m["lr"] = lr
    return m

  def evaluate(self, batches: Iterable[np.ndarray]) -> dict:
    kls, agrees = [], []
    for b in batches:
      kl, ag = self._eval_step(self.params, self.frozen, self.target.params, jnp.asarray(b))
      kls.append(float(kl))
      agrees.append(float(ag))
    return {"kl": float(np.mean(kls)), "top1_agreement": float(np.mean(agrees)),
            "batches": len(kls)}

  def draft_model(self, dtype=None) -> Transformer:
    """The current draft as a module (its parameters cast to `dtype` if given)."""
    p = dict(self.params)
    p.update(self.frozen)
    if dtype is not None:
      p = {k: v.astype(dtype) for k, v in p.items()}
    return self.draft.bind(p)

  # -- checkpointing (orbax) --

  def checkpoint_manager(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, mngr, data_position: int, extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp
    meta = {"step": self.step, "data_position": data_position,
            "total_steps": self.total_steps, **(extra or {})}
    mngr.save(self.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": self.params, "opt_state": self.opt_state}),
        meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()

  def restore(self, mngr, step: int | None = None) -> dict | None:
    """Restores the latest (or given) checkpoint; returns its metadata, None if none."""
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"params": self.params, "opt_state": self.opt_state})
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    self.params = out["state"]["params"]
    self.opt_state = out["state"]["opt_state"]
    self.step = int(out["meta"]["step"])
    if out["meta"].get("total_steps"):
      self.total_steps = int(out["meta"]["total_steps"])
    return dict(out["meta"])


def fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def train_loop(dist: Distiller, batches, *, ckpt_dir: str | None = None, resume: bool = False,
               log: Callable[[str], None] = print, time_budget_s: float | None = None,
               meta: dict | None = None, stop_after: int | None = None,
               stop_after_s: float | None = None) -> list[dict]:
  """Trains from `batches` (an object with start(pos)/next()/position) to dist.total_steps.

  With `resume`, continues from the latest checkpoint in ckpt_dir: same parameters,
  optimizer state, run length and data position. A checkpoint is written every
  tc.ckpt_every steps and at the end. With tc.steps=0 the run length is fixed after
  tc.calib_steps timed steps to what fits `time_budget_s` (seconds from this call); a
  budget also stops a fixed-length run early. `stop_after` ends this run after that step
  (the schedule is unchanged), as an interrupted run would; `stop_after_s` does the same
  at the first progress line past that many seconds (a run split over several processes
  whose lifetimes are capped, e.g. 10-minute device calls). Returns per-step metrics.
  """
  tc = dist.tc
  t0 = time.time()
  mngr = dist.checkpoint_manager(ckpt_dir) if ckpt_dir else None
  start_pos = 0
  if resume and mngr is not None:
    m = dist.restore(mngr)
    if m is not None:
      start_pos = int(m["data_position"])
      log(f"resumed from {ckpt_dir} at step {dist.step} (data position {start_pos})")
  if dist.total_steps is None and not time_budget_s:
    raise ValueError("steps=0 (auto) needs a time budget")
  batches.start(start_pos)
  history = []
  tokens_seen = 0
  first_step = dist.step
  t_mark, tok_mark, step_mark = t0, 0, dist.step
  t_first = None

  def total():
    return dist.total_steps or 10**9

  while dist.step < min(total(), stop_after or 10**9):
    b = batches.next()
    m = dist.train_step(b)
    tokens_seen += b.size
    history.append((dist.step, m))  # device scalars: read back only when logging
    if dist.step == first_step + 1:
      jax.block_until_ready(m["loss"])  # the first step includes compiling
      t_first = time.time()
      t_mark, tok_mark, step_mark = t_first, tokens_seen, dist.step
      log(f"first step done in {t_first - t0:.1f}s (compile included)")
    if dist.total_steps is None and dist.step == first_step + 1 + tc.calib_steps:
      jax.block_until_ready(m["loss"])
      per_step = (time.time() - t_first) / tc.calib_steps
      left = time_budget_s - (time.time() - t0)
      dist.total_steps = max(dist.step + 1, dist.step + int(left / per_step * 0.97))
      log(f"{per_step * 1e3:.0f} ms/step: the run is fixed at {dist.total_steps} steps "
          f"({(dist.total_steps - dist.step) * per_step:.0f}s left of the budget)")
    log_now = tc.log_every and (dist.step % tc.log_every == 0 or dist.step == total())
    if log_now:
      rec = {k: float(v) for k, v in m.items()}  # waits for the step
      now = time.time()
      dt = max(now - t_mark, 1e-9)
      tps = (tokens_seen - tok_mark) / dt
      sps = (dist.step - step_mark) / dt
      eta = (total() - dist.step) / sps if sps > 0 and dist.total_steps else float("nan")
      log(f"step {dist.step}/{dist.total_steps or '?'} loss(KL) {rec['loss']:.4f} "
          f"top1 {rec['top1']:.3f} gnorm {rec['grad_norm']:.2f} lr {rec['lr']:.2e} "
          f"tok/s {tps:,.0f} elapsed {fmt_time(now - t0)} "
          f"ETA {fmt_time(eta) if math.isfinite(eta) else '?'}")
      t_mark, tok_mark, step_mark = now, tokens_seen, dist.step
      if time_budget_s and t_first is not None and dist.step > first_step + 1:
        per_step = (now - t_first) / (dist.step - first_step - 1)
        if now - t0 + per_step * (tc.log_every + 1) > time_budget_s:
          log(f"time budget {time_budget_s:.0f}s reached at step {dist.step}")
          break
      if stop_after_s and now - t0 > stop_after_s:
        log(f"stopping this run at step {dist.step} after {now - t0:.0f}s (--stop_after_s); "
            f"the schedule goes on to step {dist.total_steps} on --resume")
        break
    if mngr is not None and tc.ckpt_every and dist.step % tc.ckpt_every == 0:
      dist.save(mngr, batches.position, meta)
  if mngr is not None and (not history or mngr.latest_step() != dist.step):
    dist.save(mngr, batches.position, meta)
  if mngr is not None:
    mngr.close()
  return [{"step": st, **{k: float(v) for k, v in m.items()}} for st, m in history]


# --- generation and the acceptance estimate -----------------------------------------------

def _bucket(n: int, q: int = 64) -> int:
  return max(q, -(-n // q) * q)


_JIT_CACHE: dict = {}


def _cached_jit(key, build):
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = build()
  return _JIT_CACHE[key]


def _fn_key(fn: Functional):
  return (fn.graphdef, fn.treedef, tuple(fn.names))


# Generation uses pages of this many slots: a power of two, so that on GPU the Pallas
# kernel serves it and each step reads only the pages up to the current position (the
# XLA reference reads the whole [B, prompt + max_new] cache every step).
GEN_PAGE = 64


def _generate(fn: Functional, impl: str, params, tokens, lens, max_new: int):
  """Greedy tokens [B, max_new] after right-padded prompts tokens [B, Lp] of lengths lens."""
  model = fn.bind(params)
  for layer in model.layers:  # a static attribute: the traced copy may use another kernel
    layer.self_attn.attention_impl = impl
  b, lp = tokens.shape
  pages_per_row = -(-(lp + max_new) // GEN_PAGE)
  row_slots = pages_per_row * GEN_PAGE
  dtype = model.embed_tokens[...].dtype
  kv = init_kv_cache(model.cfg, num_pages=b * pages_per_row, page_size=GEN_PAGE, dtype=dtype)
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  # Row r owns pages r*P .. r*P+P-1, so its slot for position t is r*P*GEN_PAGE + t.
  table = rows * pages_per_row + jnp.arange(pages_per_row, dtype=jnp.int32)[None, :]
  pos = jnp.broadcast_to(jnp.arange(lp, dtype=jnp.int32), (b, lp))
  slots = jnp.where(pos < lens[:, None], rows * row_slots + pos, -1)  # padding writes nothing
  attn = AttentionInputs(page_table=table, slot_mapping=slots, kv_limit=pos + 1)
  logits, kv, _ = model(tokens, pos, kv, attn, logits_at=lens - 1)
  first = jnp.argmax(logits, -1).astype(jnp.int32)

  def step(carry, i):
    kv, tok = carry
    p = (lens + i)[:, None]
    a = AttentionInputs(page_table=table, slot_mapping=rows * row_slots + p, kv_limit=p + 1)
    lg, kv, _ = model(tok[:, None], p, kv, a)
    nxt = jnp.argmax(lg[:, 0], -1).astype(jnp.int32)
    return (kv, nxt), nxt

  _, rest = jax.lax.scan(step, (kv, first), jnp.arange(max_new - 1, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


class Generator:
  """Batched greedy generation over the paged cache (the Pallas kernel on GPU)."""

  def __init__(self, model: Transformer, attention_impl: str = "auto"):
    from ssd_jax.kernels import resolve_impl
    self.fn = fn = Functional(model)
    impl = resolve_impl(attention_impl)
    self._jit = _cached_jit(
        ("generate", impl) + _fn_key(fn),
        lambda: jax.jit(functools.partial(_generate, fn, impl), static_argnames=("max_new",)))

  def generate(self, prompts: Sequence[Sequence[int]], max_new: int,
               eos_ids: Sequence[int] = (), batch_size: int = 32,
               time_budget_s: float | None = None) -> list[list[int]]:
    """Greedy continuations (cut after the first EOS, which is kept).

    All batches share one padded prompt length (one compilation per call). With a time
    budget, batches stop once it is spent; prompts not reached get [] (callers drop them).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    eos = set(int(e) for e in eos_ids)
    lp = _bucket(max(len(p) for p in prompts))
    t0 = time.time()
    for s in range(0, len(order), batch_size):
      if time_budget_s is not None and s and time.time() - t0 > time_budget_s:
        break
      idx = order[s:s + batch_size]
      toks = np.zeros((batch_size, lp), np.int32)
      lens = np.ones((batch_size,), np.int32)
      for r, i in enumerate(idx):
        toks[r, :len(prompts[i])] = prompts[i]
        lens[r] = len(prompts[i])
      gen = np.asarray(self._jit(self.fn.params, jnp.asarray(toks), jnp.asarray(lens),
                                 max_new=max_new))
      for r, i in enumerate(idx):
        seq = gen[r].tolist()
        for j, t in enumerate(seq):
          if t in eos:
            seq = seq[:j + 1]
            break
        out[i] = seq
    return out


def _argmax_forward(fn: Functional, params, tokens):
  return jnp.argmax(causal_forward(fn.bind(params), tokens), -1)


def draft_agreement(draft: Transformer, prompts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[int]], batch_size: int = 16,
                    fwd=None) -> list[np.ndarray]:
  """For each prompt, a bool per continuation token: is it the draft's greedy choice?"""
  fn = Functional(draft)
  if fwd is None:
    fwd = _cached_jit(("argmax",) + _fn_key(fn),
                      lambda: jax.jit(functools.partial(_argmax_forward, fn)))
  out = []
  t = _bucket(max(len(p) + len(c) for p, c in zip(prompts, continuations)))
  for s in range(0, len(prompts), batch_size):
    ps, cs = prompts[s:s + batch_size], continuations[s:s + batch_size]
    full = [list(p) + list(c) for p, c in zip(ps, cs)]
    toks = np.zeros((batch_size, t), np.int32)
    for r, f in enumerate(full):
      toks[r, :len(f)] = f
    am = np.asarray(fwd(fn.params, jnp.asarray(toks)))
    for r, (p, c) in enumerate(zip(ps, cs)):
      n = len(p)
      out.append(am[r, n - 1:n - 1 + len(c)] == np.asarray(c, np.int32))
  return out


def simulate_acceptance(agree: np.ndarray, k: int) -> tuple[list[int], int]:
  """Speculative decoding rounds at temperature 0 over one target continuation.

  Each round the draft proposes k tokens; the target accepts the leading ones that equal
  its own greedy tokens and adds one of its own (the correction, or the bonus token when
  all k match). Returns (accepted draft tokens per round, rounds).
  """
  n = len(agree)
  j, acc = 0, []
  while j < n:
    m = 0
    while m < k and j + m < n and agree[j + m]:
      m += 1
    acc.append(m)
    j += m + 1
  return acc, len(acc)


def acceptance_report(agreements: Sequence[np.ndarray], ks: Sequence[int] = (4, 7)) -> dict:
  rep = {}
  for k in ks:
    acc = [a for ag in agreements for a in simulate_acceptance(ag, k)[0]]
    mean = float(np.mean(acc)) if acc else 0.0
    rep[f"K={k}"] = {"mean_accepted_draft_tokens": mean,
                     "tokens_per_round": mean + 1.0,
                     "rounds": len(acc),
                     "all_accepted_frac": float(np.mean([a == k for a in acc])) if acc else 0.0}
  flat = np.concatenate([np.asarray(a, bool) for a in agreements]) if agreements else np.zeros(0)
  rep["greedy_token_agreement"] = float(flat.mean()) if flat.size else 0.0
  rep["tokens"] = int(flat.size)
  return rep


def estimate_acceptance(target: Transformer, draft: Transformer,
                        prompts: Sequence[Sequence[int]], *, max_new: int = 128,
                        ks: Sequence[int] = (4, 7), eos_ids: Sequence[int] = (),
                        batch_size: int = 32, continuations=None) -> tuple[dict, list]:
  """Target greedy continuations of `prompts`, then the draft's acceptance per K."""
  if continuations is None:
    continuations = Generator(target).generate(prompts, max_new, eos_ids, batch_size)
  agree = draft_agreement(draft, prompts, continuations, batch_size=min(batch_size, 16))
  rep = acceptance_report(agree, ks)
  rep["prompts"] = len(prompts)
  rep["max_new"] = max_new
  return rep, continuations


def save_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
