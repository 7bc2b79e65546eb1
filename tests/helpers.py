"""Shared test utilities: tiny random HF checkpoints and a paged-cache greedy runner."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ssd_jax.models.transformer import AttentionInputs, init_kv_cache
from ssd_jax.sharding.rules import KV_PAGES_AXES, spec_for

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Small enough for CPU, big enough that every code path (GQA, llama3 RoPE scaling, tied
# embeddings, head_dim != hidden / heads, q/k norms) matters for the logits.
TINY_KINDS = {
    # GQA (4 query heads over 2 KV heads), Llama-3.1 RoPE scaling, untied head.
    "llama": dict(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING,
                  max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
    # Tied input/output embeddings, plain RoPE, MHA.
    "llama_tied": dict(family="llama", vocab_size=80, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=16, rope_theta=500000.0, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Qwen3: q/k RMSNorm, head_dim (24) != hidden / heads (12).
    "qwen3": dict(family="qwen3", vocab_size=96, hidden_size=48, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, rope_theta=1000000.0, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Tensor parallel: heads (8), KV heads (4), MLP (128) and vocab (128) divide by 4.
    "tp": dict(family="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
               head_dim=8, rope_theta=10000.0, max_position_embeddings=128,
               rms_norm_eps=1e-6, tie_word_embeddings=False),
    # attention_bias: HF Llama then has q/k/v AND o_proj biases.
    "llama_bias": dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, rope_theta=10000.0, max_position_embeddings=128,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True),
}


def kernel_jit(f):
  """jax.jit; on CPU with a cheap XLA pipeline (interpret-mode kernels compile slowly)."""
  if jax.default_backend() == "cpu":
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0,
                                        "xla_llvm_disable_expensive_passes": True})
  return jax.jit(f)


def hf_config(kind: str):
  import transformers
  kw = dict(TINY_KINDS[kind])
  family = kw.pop("family")
  cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
  return cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def make_tiny_hf_model(kind: str, seed: int = 0):
  """A tiny random float32 transformers model whose logits are far from uniform."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      hf_config(kind), dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
  return model.eval()


def make_tiny_tokenizer(vocab_size: int):
  """A word-level tokenizer (w3 .. w{V-1}, specials 0..2) saved alongside tiny models."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<unk>")


def make_tiny_hf_checkpoint(tmpdir, kind: str, *, seed: int = 0, max_shard_size=None,
                            tokenizer: bool = True) -> str:
  """Saves a tiny random transformers model (float32 safetensors) to tmpdir/kind.

  Returns the directory. `max_shard_size` (e.g. "20KB") gives a sharded index checkpoint.
  """
  out = os.path.join(str(tmpdir), kind + ("-sharded" if max_shard_size else ""))
  model = make_tiny_hf_model(kind, seed)
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out, **kw)
  if tokenizer:
    make_tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
  return out


def hf_logits(hf_model, tokens) -> np.ndarray:
  """float32 logits [len, V] of a transformers model on one unpadded sequence."""
  import torch
  with torch.no_grad():
    out = hf_model(torch.tensor([list(tokens)], dtype=torch.long))
  return out.logits[0].float().numpy()


def max_rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, positions, kv, attn):
  logits, kv, _ = nnx.merge(graphdef, state)(tokens, positions, kv, attn)
  return logits, kv


def _step_fn(model):
  """A jitted forward step; models of one config share the compiled program."""
  graphdef, state = nnx.split(model)
  return functools.partial(_step, graphdef), state


def run_paged(model, cfg, prompts, num_decode: int, *, page_size: int = 4, mesh=None,
              forced=None):
  """Prefill `prompts` (ragged, right-padded) then `num_decode` greedy decode steps.

  Each sequence gets interleaved pages (1 + b + B*j; page 0 stays unused) so paging is
  exercised. `forced[b]` (optional) overrides the tokens fed to the decode steps.

  Returns dict: prefill [B, L, V] logits (rows >= len(prompt) are padding), decode
  [num_decode, B, V] logits, tokens [B, num_decode + 1] (the greedy continuation; the
  last one is predicted by the last decode step).
  """
  b = len(prompts)
  lens = np.array([len(p) for p in prompts])
  lmax = int(lens.max())
  pages_per_seq = -(-(lmax + num_decode) // page_size)
  num_pages = 1 + b * pages_per_seq
  page_table = np.array([[1 + s + b * j for j in range(pages_per_seq)] for s in range(b)],
                        np.int32)
  dtype = model.embed_tokens[...].dtype
  kv = init_kv_cache(cfg, num_pages, page_size, dtype)
  if mesh is not None:
    sh = NamedSharding(mesh, spec_for(KV_PAGES_AXES))
    kv = jax.tree.map(lambda x: jax.device_put(x, sh), kv)
  step, state = _step_fn(model)

  def slots(pos):
    return page_table[np.arange(b)[:, None], pos // page_size] * page_size + pos % page_size

  tokens = np.zeros((b, lmax), np.int32)
  for s, p in enumerate(prompts):
    tokens[s, :len(p)] = p
  pos = np.broadcast_to(np.arange(lmax, dtype=np.int32), (b, lmax))
  valid = pos < lens[:, None]
  attn = AttentionInputs(page_table=jnp.asarray(page_table),
                         slot_mapping=jnp.asarray(np.where(valid, slots(pos), -1), jnp.int32),
                         kv_limit=jnp.asarray(np.minimum(pos + 1, lens[:, None]), jnp.int32))
  logits, kv = step(state, jnp.asarray(tokens), jnp.asarray(pos), kv, attn)
  prefill = np.asarray(logits)
  nxt = prefill[np.arange(b), lens - 1].argmax(-1).astype(np.int32)
  out_tokens, decode = [nxt], []
  for i in range(num_decode):
    feed = nxt if forced is None else np.array([f[i] for f in forced], np.int32)
    p = (lens + i).astype(np.int32)[:, None]
    attn = AttentionInputs(page_table=jnp.asarray(page_table),
                           slot_mapping=jnp.asarray(slots(p), jnp.int32),
                           kv_limit=jnp.asarray(p + 1, jnp.int32))
    logits, kv = step(state, jnp.asarray(feed[:, None]), jnp.asarray(p), kv, attn)
    row = np.asarray(logits)[:, 0]
    decode.append(row)
    nxt = row.argmax(-1).astype(np.int32)
    out_tokens.append(nxt)
  return {"prefill": prefill, "decode": np.stack(decode) if decode else None,
          "tokens": np.stack(out_tokens, axis=1), "lens": lens}


def greedy_generate(model, cfg, prompts, max_new_tokens: int, **kw) -> list[list[int]]:
  """Greedy continuation of each prompt (no early stop at EOS), via `run_paged`."""
  out = run_paged(model, cfg, prompts, max_new_tokens - 1, **kw)
  return [list(map(int, row)) for row in out["tokens"]]


@contextlib.contextmanager
def fast_gguf_name_maps():
  """Memoizes `gguf.get_tensor_name_map` while transformers (torch) reads a GGUF.

  transformers rebuilds the same (pure, read-only) name map once per module of the model,
  which is most of its GGUF load time for a small model; the cache is removed afterwards.
  Only the torch references in the tests load GGUF through transformers.
  """
  import gguf as gguf_pkg
  orig = gguf_pkg.get_tensor_name_map
  gguf_pkg.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig)
  try:
    yield
  finally:
    gguf_pkg.get_tensor_name_map = orig


def load_gguf_with_transformers(gguf_path: str):
  """The torch reference: transformers' own GGUF loader (dequantizes into a torch model)."""
  import torch
  import transformers
  with fast_gguf_name_maps():
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32, local_files_only=True).eval()
