"""A model placed on a mesh with its KV page pool, and the jitted prefill program.

The runner owns device state (parameters, pages) and turns host batches into device
arrays; the decoders (AR, SD, SSD) build their per-step programs on `forward`. Every jitted
function goes through `self.jit` so that compilations can be counted: after warm-up the
count must not grow.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ssd_jax import kernels
from ssd_jax.models.transformer import AttentionInputs, KVCache, Transformer, init_kv_cache
from ssd_jax.sharding.rules import KV_PAGES_AXES, param_shardings, sharding_for


# XLA command buffers (CUDA graphs) for every program of a runner, as per-compile XLA
# options (`jax.jit(compiler_options=...)`; ignored off GPU). At batch 1 a step is
# hundreds of small kernels, and the host launching them one by one can be slower than
# the GPU running them.
#   default: XLA's own choice (straight-line runs of >= 5 kernels / library calls in one
#            graph; loops and conditionals stay on the host: a `lax.cond` copies its
#            predicate to the host and waits for it, a scan launches its body per step);
#   off:     every kernel launched by the host (to measure how launch-bound a program is);
#   max:     loops and conditionals too (CUDA graph conditional nodes), in graphs of any
#            size: a whole program, scans and the SSD lookup's fallback included, can be
#            one graph launch and never waits on the host.
COMMAND_BUFFER_MODES: dict[str, dict | None] = {
    "default": None,
    "off": {"xla_gpu_enable_command_buffer": ""},
    "max": {"xla_gpu_enable_command_buffer":
            "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
            "xla_gpu_graph_min_graph_size": 1},
}


def compiler_options_for(command_buffers: str | None) -> dict | None:
  if command_buffers is None:
    return None
  if command_buffers not in COMMAND_BUFFER_MODES:
    raise ValueError(f"command_buffers {command_buffers!r} is unknown; use one of "
                     f"{', '.join(COMMAND_BUFFER_MODES)}")
  return COMMAND_BUFFER_MODES[command_buffers]


def bucket(n: int, minimum: int = 1) -> int:
  """Round up to a power of two (shape buckets keep the number of programs small)."""
  n = max(n, minimum)
  return 1 << (n - 1).bit_length()


def slot_mapping(page_table, positions, valid, page_size: int):
  """Flat KV slot of each (sequence, position); -1 where nothing may be written."""
  page = jnp.take_along_axis(page_table, positions // page_size, axis=1)
  return jnp.where(valid, page * page_size + positions % page_size, -1).astype(jnp.int32)


def paged_step(page_table, positions, valid, page_size: int) -> AttentionInputs:
  """The attention inputs of a step whose tokens are written to the pages: token (b, i) at
  `positions[b, i]` writes its K/V there and sees every position up to its own; `valid`
  ([B, Q] or broadcastable) False writes nothing and sees nothing."""
  return AttentionInputs(page_table=page_table,
                         slot_mapping=slot_mapping(page_table, positions, valid, page_size),
                         kv_limit=jnp.where(valid, positions + 1, 0))


class ModelRunner:
  def __init__(self, model: Transformer, mesh, *, num_pages: int, page_size: int,
               kv_dtype=None, name: str = "model", compiler_options: dict | None = None,
               min_rows: int | None = None):
    self.name = name
    # On GPU, XLA's GEMM kernels for a single row read the weights markedly slower than
    # for eight (one H200, bf16: an 8B-shape decode step took 5.25 ms at 1 row and 4.32 ms
    # with the same 1 row padded to 8; bench/RESULTS.md), so steps of fewer tokens are
    # padded to 8 rows there. The CPU's single-row path is not slower: no padding.
    self.min_rows = (min_rows if min_rows is not None
                     else 8 if jax.default_backend() == "gpu" else 1)
    self.compiler_options = dict(compiler_options) if compiler_options else None
    self.cfg = model.cfg
    self.mesh = mesh
    self.page_size = page_size
    self.num_pages = num_pages
    self.graphdef, params = nnx.split(model)
    # Place (or re-place) every parameter by its logical axes; a no-op for a model the
    # loader already built on this mesh.
    params = jax.device_put(params, param_shardings(mesh, params))
    # Programs take the parameters as a flat list: flattening an nnx.State on every
    # dispatch costs host time on each token; a list of arrays flattens in C++.
    leaves, self._param_tree = jax.tree.flatten(params)
    self.params: list[jax.Array] = leaves
    # float32 means float32: on GPU, XLA runs float32 matmuls as TF32 by default, and TF32
    # rounds a 1-token step and a K+1-token verification differently enough to flip
    # near-tied argmaxes, so SD/SSD could not be checked against AR token for token.
    # bfloat16 models keep XLA's default (their own rounding already differs that way).
    self.matmul_precision = ("highest" if model.embed_tokens[...].dtype == jnp.float32
                             else None)
    kv_dtype = kv_dtype or model.embed_tokens[...].dtype
    self.kv_dtype = kv_dtype
    kv_sharding = sharding_for(mesh, KV_PAGES_AXES)
    self.kv_shardings = KVCache(k=[kv_sharding] * self.cfg.num_layers,
                                v=[kv_sharding] * self.cfg.num_layers)
    self._jitted: list = []
    self._prefill_shapes: set[tuple[int, int, int]] = set()  # (batch, tokens, table width)
    self._prefill_widths: dict[tuple[int, int], int] = {}  # (batch, width) -> whole-prompt bucket
    # Created by a program like every later KV, so its sharding reads the same to jit.
    self.kv: KVCache = self.jit(functools.partial(init_kv_cache, self.cfg, num_pages,
                                                  page_size, kv_dtype))()
    self._jitted.clear()
    self.prefill_fn = self.jit(self._prefill, donate_argnums=(1,))

  # -- placement ----------------------------------------------------------------------
  @property
  def replicated_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def put(self, tree):
    """Host or other-mesh arrays -> this mesh, replicated (device to device if on device)."""
    return jax.device_put(tree, self.replicated_sharding)

  # -- compiled programs -----------------------------------------------------------------
  def jit(self, fn, **kwargs):
    """jax.jit, counted; KV caches a program returns keep the pool's exact sharding, so
    that feeding them to the next program never looks like a new input (recompile)."""
    def pinned(*args, **kw):
      out = fn(*args, **kw)
      return jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(x, self.kv_shardings)
          if isinstance(x, KVCache) else x, out, is_leaf=lambda x: isinstance(x, KVCache))
    functools.update_wrapper(pinned, fn)
    if self.compiler_options:
      kwargs.setdefault("compiler_options", self.compiler_options)
    jitted = jax.jit(pinned, **kwargs)
    self._jitted.append(jitted)
    return jitted

  def num_compilations(self) -> int:
    return sum(f._cache_size() for f in self._jitted)

  def run(self, program, *args, **kwargs):
    """Calls a program of this runner's that takes (params, kv, ...) and returns
    (kv, ...): the runner keeps the new KV (the old one was donated) and returns the rest.
    Only the runner writes its KV, so each runner is driven from one host thread."""
    self.kv, *out = program(self.params, self.kv, *args, **kwargs)
    return out[0] if len(out) == 1 else tuple(out)

  def forward(self, params, kv, tokens, positions, attn, scratch=None, logits_at=None):
    """Pure model call, for use inside the decoders' jitted programs.

    A paged step of fewer than `min_rows` tokens in all (batch x queries) is padded with
    rows that write nothing and see nothing, and their outputs are dropped: see
    `min_rows` in __init__ for why."""
    model = nnx.merge(self.graphdef, jax.tree.unflatten(self._param_tree, params))
    precision = (jax.default_matmul_precision(self.matmul_precision)
                 if self.matmul_precision else contextlib.nullcontext())
    b, q = tokens.shape
    pad = -(-self.min_rows // q) - b if scratch is None else 0
    if pad > 0:
      rows = lambda x, value=0: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1),
                                        constant_values=value)
      tokens, positions = rows(tokens), rows(positions)
      attn = AttentionInputs(page_table=rows(attn.page_table),
                             slot_mapping=(None if attn.slot_mapping is None
                                           else rows(attn.slot_mapping, -1)),
                             kv_limit=rows(attn.kv_limit))
      logits_at = None if logits_at is None else rows(logits_at)
    with kernels.on_mesh(self.mesh), precision:
      logits, kv, scratch = model(tokens, positions, kv, attn, scratch=scratch,
                                  logits_at=logits_at)
    return (logits[:b] if pad > 0 else logits), kv, scratch

  def _prefill(self, params, kv, tokens, start, length, page_table):
    """Writes KV for tokens[b, :length[b]] at positions start[b].. and returns the logits
    of each sequence's last token ([B, V]); rows with length 0 are padding."""
    t = tokens.shape[1]
    offs = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = start[:, None] + offs
    valid = offs < length[:, None]
    attn = paged_step(page_table, positions, valid, self.page_size)
    logits, kv, _ = self.forward(params, kv, tokens, positions, attn,
                                 logits_at=jnp.maximum(length - 1, 0))
    return logits, kv

  def prefill(self, token_rows: list[list[int]], starts: list[int], page_table: np.ndarray,
              batch: int):
    """Prefill a wave (host lists, padded to shape buckets); returns device logits [B, V]."""
    t = bucket(max(len(r) for r in token_rows), 16)
    tokens = np.zeros((batch, t), np.int32)
    length = np.zeros((batch,), np.int32)
    start = np.zeros((batch,), np.int32)
    for i, (row, s) in enumerate(zip(token_rows, starts)):
      tokens[i, :len(row)] = row
      length[i] = len(row)
      start[i] = s
    logits, self.kv = self.prefill_fn(self.params, self.kv, *self.put(
        (tokens, start, length, page_table)))
    width = page_table.shape[1]
    self._prefill_shapes.add((batch, t, width))
    # The bucket this wave's prompts would need with nothing cached: warmed later too.
    full = bucket(max(s + len(r) for r, s in zip(token_rows, starts)), 16)
    self._prefill_widths[(batch, width)] = max(self._prefill_widths.get((batch, width), 0),
                                               full)
    return logits

  def warm_prefill_buckets(self) -> int:
    """Compiles the prefill for every token bucket up to the whole prompt's, for each
    (batch, page-table width) prefilled so far; returns how many it ran.

    How many tokens a prompt prefills depends on the prefix cache: only the suffix after
    its cached pages (a smaller bucket under the same page-table width), or all of it
    when nothing is cached, which a warm-up that itself hit the cache did not compile.
    The calls have length 0 (every slot -1), so they write nothing."""
    ran = 0
    for (batch, width), t_max in sorted(self._prefill_widths.items()):
      t = 16
      while t <= t_max:
        ran += self.warm_prefill(batch, t, width)
        t *= 2
    return ran

  def warm_prefill(self, batch: int, tokens: int, width: int) -> bool:
    """Runs the prefill once at these shapes (length 0: writes nothing) unless it has
    run at them before; returns whether it ran."""
    if (batch, tokens, width) in self._prefill_shapes:
      return False
    zeros = np.zeros((batch,), np.int32)
    _, self.kv = self.prefill_fn(self.params, self.kv, *self.put(
        (np.zeros((batch, tokens), np.int32), zeros, zeros,
         np.zeros((batch, width), np.int32))))
    self._prefill_shapes.add((batch, tokens, width))
    return True

  def restore_kv(self) -> bool:
    """A fresh (zero) KV pool if the current one is gone: a program that donates it was
    dispatched but its result never stored (an interrupt in between). Returns whether
    it made one; the old contents are lost, so cached prefixes must be dropped."""
    if not any(x.is_deleted() for x in jax.tree.leaves(self.kv)):
      return False
    n = len(self._jitted)
    self.kv = self.jit(functools.partial(init_kv_cache, self.cfg, self.num_pages,
                                         self.page_size, self.kv_dtype))()
    del self._jitted[n:]  # as in __init__: not a program of the decode path
    return True
