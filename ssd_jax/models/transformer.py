"""The decoder shared by Llama-3 and Qwen3 (Flax NNX).

Differences between the families are config switches (q/k norm, bias, tied embeddings,
RoPE scaling), not copies. Every parameter carries its logical axis names (`axes=`), which
`ssd_jax.sharding.rules` maps to mesh axes; the model itself never names a mesh axis.

One forward call handles every kind of step: prefill chunks, single-token decode, K+1-token
verification, and SSD tree decode (M branch queries that also attend to their own scratch
KV). The caller describes the step with `AttentionInputs`; the model writes the new tokens'
K/V into the pages given by `slot_mapping` and attends to what `kv_limit` allows.

The Q/K/V projections and the gate/up projections are stored fused (`FUSED_PARAMS`): one
GEMM each per layer; checkpoints keep HuggingFace's separate tensors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.config import ModelConfig
from ssd_jax import kernels
from ssd_jax.models.rope import rope_frequencies


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionInputs:
  """Where a step's tokens live in the paged cache and what each may see.

  page_table: int32 [B, P] page ids of each sequence, in logical order.
  slot_mapping: int32 [B, Q] flat slot (page * page_size + offset) to write each new
    token's K/V to; -1 writes nothing (padding). None writes nothing at all (tree steps,
    whose K/V live in scratch).
  kv_limit: int32 [B, Q] query (b, i) attends to logical positions [0, kv_limit[b, i]).
  """
  page_table: jax.Array
  slot_mapping: jax.Array
  kv_limit: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer page pools, each [num_pages, page_size, num_kv_heads, head_dim]."""
  k: list
  v: list

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TreeScratch:
  """Private KV of tree branches: per layer [B, M, S, 2, num_kv_heads, head_dim], K and V
  stacked on axis 3 so that one in-place update per layer writes both.

  At tree step `step` each branch writes its token's K/V to slot `step` and attends to
  slots [0, step] on top of the paged context; nothing is written to the pages.
  """
  kv: list
  step: jax.Array


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
  shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
                 v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)])


def init_tree_scratch(cfg: ModelConfig, batch: int, branches: int, steps: int,
                      dtype) -> TreeScratch:
  shape = (batch, branches, steps, 2, cfg.num_kv_heads, cfg.head_dim)
  return TreeScratch(kv=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
                     step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Fused:
  """A parameter that holds several HuggingFace tensors side by side along `axis`.

  Each part takes one slot of the axis and its own layout lacks that axis (K in the
  [group + 2] axis of `qkv_proj`, gate in the [2] axis of `gate_up_proj`), except `wide`,
  which fills the rest of the axis and keeps it: the query heads of each KV group, so
  that merging the axis into the one before it (kv_heads x group = heads, HF's GQA
  order) gives back q_proj's own head axis.
  """
  parts: tuple[str, ...]
  axis: int
  wide: str | None = None


# Parameters that fuse HuggingFace tensors, so that one GEMM computes what HF does with
# two or three (at batch 1 a decode step is a chain of small kernels, each costing a few
# microseconds whatever its bytes). The fused axis carries the logical name "stack",
# which is never sharded: Q/K/V are grouped by KV head ([embed, kv_heads, group + 2,
# head_dim]: each KV head's `group` query heads, then its K, then its V), so tensor
# parallelism over KV heads gives every shard its own query heads with their K and V, as
# for separate tensors. Checkpoints keep HF's separate tensors: checkpoint/layout.py
# splits and joins them.
FUSED_PARAMS: dict[str, Fused] = {
    "qkv_proj": Fused(("q_proj", "k_proj", "v_proj"), 2, wide="q_proj"),
    "qkv_bias": Fused(("q_bias", "k_bias", "v_bias"), 1, wide="q_bias"),
    "gate_up_proj": Fused(("gate_proj", "up_proj"), 1),   # [embed, 2, mlp]
}


def _param(rngs, shape, axes, dtype, scale=0.02):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype, axes=("embed",)):
    self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
    self.eps = eps

  def __call__(self, x):
    return kernels.rms_norm(x, self.weight[...], eps=self.eps)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str):
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kv
    # Q, K and V in one GEMM, grouped by KV head (see FUSED_PARAMS).
    self.qkv_proj = _param(rngs, (e, kv, g + 2, d),
                           ("embed", "kv_heads", "stack", "head_dim"), dtype)
    self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype)
    if cfg.attention_bias:
      self.qkv_bias = nnx.Param(jnp.zeros((kv, g + 2, d), dtype),
                                axes=("kv_heads", "stack", "head_dim"))
      self.o_bias = nnx.Param(jnp.zeros((e,), dtype), axes=("embed",))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axes=("head_dim",))
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, axes=("head_dim",))
    self.cfg = cfg
    self.attention_impl = attention_impl

  def __call__(self, x, positions, k_pages, v_pages, attn: AttentionInputs,
               scratch_kv=None, scratch_step=None):
    qkv = jnp.einsum("bse,ekgd->bskgd", x, self.qkv_proj[...])
    out, k_pages, v_pages, scratch_kv = self.attend(qkv, positions, k_pages, v_pages, attn,
                                                    scratch_kv, scratch_step)
    b, s_len = x.shape[:2]
    # One contraction over the flattened (head, head_dim) axis: contracting over two
    # axes, XLA's CPU backend picked the order (head_dim, head) and transposed the whole
    # o_proj weight into a temporary on every step; flattened (a free reshape of both
    # row-major operands) it reads the weight in place, and only the small activation
    # may be relaid.
    y = jnp.einsum("bsf,fe->bse", out.reshape(b, s_len, -1), self.o_proj_flat())
    if self.cfg.attention_bias:
      y = y + self.o_bias[...]
    return y, k_pages, v_pages, scratch_kv

  def o_proj_flat(self):
    o_proj = self.o_proj[...]
    return o_proj.reshape(-1, o_proj.shape[-1])

  def attend(self, qkv, positions, k_pages, v_pages, attn: AttentionInputs,
             scratch_kv=None, scratch_step=None):
    """Attention from the Q/K/V projection's output [B, S, kv, g + 2, d] (bias not yet
    added): returns (out [B, S, heads, d], k_pages, v_pages, scratch_kv)."""
    cfg = self.cfg
    if cfg.attention_bias:
      qkv = qkv + self.qkv_bias[...]
    b, s_len, g = qkv.shape[0], qkv.shape[1], qkv.shape[3] - 2  # g: query heads per KV head
    if cfg.qk_norm:
      qkv = jnp.concatenate([self.q_norm(qkv[:, :, :, :g]),
                             self.k_norm(qkv[:, :, :, g:g + 1]), qkv[:, :, :, g + 1:]],
                            axis=3)
    # Computed at trace time from the config (a constant in the compiled program).
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    if attn.slot_mapping is not None and scratch_kv is None:
      # The rotations and both page writes in one kernel where the impl allows; it reads
      # Q, K and V from the projection's output as it is (no slices to copy first).
      q, k_pages, v_pages = kernels.rope_write_kv(qkv, positions, inv_freq, k_pages,
                                                  v_pages, attn.slot_mapping,
                                                  impl=self.attention_impl)
    else:
      q = qkv[:, :, :, :g].reshape(b, s_len, cfg.num_heads, cfg.head_dim)
      q = kernels.apply_rope(q, positions, inv_freq)
      k, v = kernels.apply_rope(qkv[:, :, :, g], positions, inv_freq), qkv[:, :, :, g + 1]
      if attn.slot_mapping is not None:
        k_pages, v_pages = kernels.write_kv(k_pages, v_pages, k, v, attn.slot_mapping)
    scale = cfg.head_dim ** -0.5
    out, lse = kernels.paged_attention(q, k_pages, v_pages, attn.page_table, attn.kv_limit,
                                       scale=scale, impl=self.attention_impl)
    if scratch_kv is not None:
      # One in-place write of this step's K and V (stacked) into the branch scratch, then
      # the paged result extended by the scratch slots [0, step] in one fused pass.
      new = jnp.stack([k, v], axis=2)[:, :, None].astype(scratch_kv.dtype)
      scratch_kv = jax.lax.dynamic_update_slice_in_dim(scratch_kv, new, scratch_step, axis=2)
      out = kernels.extend_attention(out, lse, q, scratch_kv, scratch_step + 1, scale=scale)
    return out, k_pages, v_pages, scratch_kv


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    # Gate and up stacked: one GEMM for both; under TP each shard holds the gate and up
    # columns of its own slice of `mlp`, so silu(gate) * up needs no communication.
    self.gate_up_proj = _param(rngs, (e, 2, m), ("embed", "stack", "mlp"), dtype)
    self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), dtype)

  def __call__(self, x):
    gate_up = jnp.einsum("bse,etm->bstm", x, self.gate_up_proj[...])
    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    return jnp.einsum("bsm,me->bse", jax.nn.silu(gate) * up, self.down_proj[...])


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, attention_impl: str,
               matmul_impl: str = "xla"):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.self_attn = Attention(cfg, dtype, rngs, attention_impl)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)
    self.matmul_impl = matmul_impl

  def __call__(self, x, positions, k_pages, v_pages, attn, scratch_kv=None,
               scratch_step=None):
    if kernels.fused_matmul_applies(x.shape[0] * x.shape[1], self.matmul_impl):
      return self._fused(x, positions, k_pages, v_pages, attn, scratch_kv, scratch_step)
    h, k_pages, v_pages, scratch_kv = self.self_attn(
        self.input_layernorm(x), positions, k_pages, v_pages, attn, scratch_kv, scratch_step)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, k_pages, v_pages, scratch_kv

  def _fused(self, x, positions, k_pages, v_pages, attn, scratch_kv, scratch_step):
    """The same layer with each norm, the activation and both residual adds inside the
    weight product next to it (`kernels.fused_matmul`): 4 products + the 2 attention
    kernels where XLA launches 12 at few rows (bench/RESULTS.md)."""
    b, s_len, e = x.shape
    sa, mlp, eps = self.self_attn, self.mlp, self.input_layernorm.eps
    impl = self.matmul_impl
    x2 = x.reshape(b * s_len, e)
    wqkv = sa.qkv_proj[...]
    qkv = kernels.fused_matmul(x2, wqkv.reshape(e, -1), norm_gain=self.input_layernorm.weight[...],
                               eps=eps, impl=impl).reshape((b, s_len) + wqkv.shape[1:])
    out, k_pages, v_pages, scratch_kv = sa.attend(qkv, positions, k_pages, v_pages, attn,
                                                  scratch_kv, scratch_step)
    residual = x2 + sa.o_bias[...] if sa.cfg.attention_bias else x2
    x2 = kernels.fused_matmul(out.reshape(b * s_len, -1), sa.o_proj_flat(), residual=residual,
                              impl=impl)
    act = kernels.fused_matmul(x2, mlp.gate_up_proj[...], gated=True, impl=impl,
                               norm_gain=self.post_attention_layernorm.weight[...],
                               eps=self.post_attention_layernorm.eps)
    x2 = kernels.fused_matmul(act, mlp.down_proj[...], residual=x2, impl=impl)
    return x2.reshape(b, s_len, e), k_pages, v_pages, scratch_kv


class Transformer(nnx.Module):
  """Llama-3 / Qwen3 causal LM over a paged KV cache.

  Parameter names follow HuggingFace's (`layers[i].self_attn.q_proj`, ...) so that a
  checkpoint maps onto the model by name, except the fused parameters of `FUSED_PARAMS`;
  shapes are split per head for sharding.
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               attention_impl: str = "xla", matmul_impl: str = "xla"):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg = cfg
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                               dtype, scale=1.0)
    # Layers are unrolled at trace time (a Python loop inside jit): each layer's weights
    # and KV pool stay separate buffers, so XLA reads them in place and updates the cache
    # in place; nothing loops over layers at run time.
    self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs, attention_impl, matmul_impl)
                            for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

  def set_attention_impl(self, impl: str) -> None:
    """Selects every layer's attention kernels ("xla", "pallas" or "auto"); a program
    traced afterwards uses them."""
    for layer in self.layers:
      layer.self_attn.attention_impl = impl

  def set_matmul_impl(self, impl: str) -> None:
    """Selects how every layer computes its weight products at decode-sized steps: "xla"
    (norm, GEMM, activation and residual adds as XLA fuses them) or "pallas" / "auto"
    (`kernels.fused_matmul`: each norm, the activation and the residual adds inside the
    product's kernel); a program traced afterwards uses them."""
    kernels.resolve_impl(impl, "matmul impl")  # fails on an unknown name
    for layer in self.layers:
      layer.matmul_impl = impl

  def logits(self, h):
    if self.cfg.tie_word_embeddings:
      return jnp.einsum("...e,ve->...v", h, self.embed_tokens[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)

  def __call__(self, tokens, positions, kv: KVCache, attn: AttentionInputs,
               scratch: TreeScratch | None = None, logits_at=None):
    """Runs one step.

    Args:
      tokens, positions: int32 [B, Q].
      kv: the paged cache (returned updated; donate it when jitting).
      attn: page table, slots to write and per-query visibility.
      scratch: tree scratch KV for SSD branch decoding, or None.
      logits_at: int32 [B] to return only the logits of that query index (prefill);
        None returns logits for all Q queries.

    Returns (float32 logits [B, Q, V] or [B, V], kv, scratch).
    """
    x = self.embed_tokens[...][tokens]
    new_k, new_v, new_skv = [], [], []
    for i, layer in enumerate(self.layers):
      scratch_kv = scratch.kv[i] if scratch is not None else None
      x, kp, vp, scratch_kv = layer(x, positions, kv.k[i], kv.v[i], attn, scratch_kv,
                                    scratch.step if scratch is not None else None)
      new_k.append(kp)
      new_v.append(vp)
      new_skv.append(scratch_kv)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    logits = self.logits(self.norm(x))
    new_scratch = None
    if scratch is not None:
      new_scratch = TreeScratch(kv=new_skv, step=scratch.step + 1)
    return logits, KVCache(k=new_k, v=new_v), new_scratch
