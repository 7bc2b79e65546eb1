"""Peer timing: jax-ml/jax-llm-examples `llama3_jax`, run unmodified, decode at Llama-3.1-8B shapes.

The peer's code is imported from --llama3_dir (a checkout of the repository's `llama3/` folder,
default .peer/llama3, put on sys.path); none of it is copied here. What is used, all from
`llama3_jax.model` (l3jax) and `llama3_jax.configs`:

  config   dataclasses.replace(configs.LLAMA3_8B, mesh=..., max_seq_len=..., quant_layer=...,
           quant_cache=...): its own Llama-3.1-8B preset (4096 / 32 layers / 32 q heads / 8 kv
           heads / head_dim 128 / MLP 14336 / vocab 128256 / rope 500000 + llama3 scaling
           8, 1, 4, 8192), checked field by field below. bf16 weights and cache by default
           (the preset's int8 layers and cache: --quant).
  mesh     jax.make_mesh((1, 1, 1), ("x", "y", "z"), axis_types=(AxisType.Explicit,) * 3) on one
           device, as its main.py / tests build it (axes x = batch, y, z = tensor).
  weights  l3jax.Weights.init(random.key(seed), cfg): its random init, sharded by its rules.
  cache    l3jax.KVCache.init(random.key(.), cfg, batch): its dense (ring) cache of max_seq_len
           slots. --fill random (default): every K/V buffer replaced by random values of the
           same shape/dtype/sharding, iter = prompt_len, starts = 0 (i.e. a prompt of
           prompt_len tokens "already prefilled"); --fill decode: prompt_len real decode steps
           from the empty cache; --fill prefill: its l3jax.prefill (may fail on new jax: a
           ShardingTypeError in lax.associative_scan under an Explicit mesh has been seen).
  step     l3jax.decode_step(tokens, weights, cache, cfg): the function its main.py calls per
           token (already @jax.jit with donate_argnames=("cache",) in its model.py), called
           under `with jax.sharding.set_mesh(cfg.mesh)` as main.py does.

Timing, after --warmup steps: (1) per-step: --steps steps, each blocked (tokens and cache);
ms/token = median; (2) back-to-back: a fresh cache at the same positions, --steps steps
dispatched without blocking, one block at the end; tokens/s = batch * steps / elapsed.
Both include the peer's own Python dispatch (it is how its main.py runs). The jit cache size
of decode_step is checked to be unchanged over the timed loops (no recompiles), and the
cache cursor to have advanced by exactly the steps run.

Shim: llama3_jax/model.py imports jax.experimental.array_serialization.pytree_serialization
at module level (only its save_pytree/load_pytree use it; not used here). That import needs
`flatbuffers`; when it is missing, a placeholder module is put in sys.modules for it (and
recorded in the JSON as "shims"), so the peer's model code itself runs as is.

  JAX_PLATFORMS=cpu python bench/peer_jax_llm_examples.py --tiny              # CPU smoke test
  python bench/peer_jax_llm_examples.py --output_json $OUT/peer_jax_llm_examples.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types

from absl import app, flags

flags.DEFINE_string("llama3_dir", ".peer/llama3",
                    "Checkout of jax-llm-examples' llama3/ folder (holds llama3_jax/).")
flags.DEFINE_integer("max_seq_len", 512, "KV cache slots (cfg.max_seq_len).")
flags.DEFINE_integer("steps", 128, "Timed decode steps per phase (--tiny: 4 unless given).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("warmup", 4, "Untimed decode steps before each timed phase (>= 2).")
flags.DEFINE_integer("prompt_len", 128, "Cache positions already filled before decoding.")
flags.DEFINE_enum("fill", "random", ["random", "decode", "prefill"],
                  "How the cache gets its prompt_len positions (see the module doc).")
flags.DEFINE_bool("quant", False, "Use the preset's int8 weights and int8 KV cache (default bf16).")
flags.DEFINE_bool("tiny", False, "Tiny config for a CPU smoke test (2 layers, hidden 128, vocab 512).")
flags.DEFINE_integer("seed", 0, "PRNG seed for weights, cache and tokens.")
flags.DEFINE_string("output_json", None, "Write the result (or the failure) here as JSON.")

FLAGS = flags.FLAGS

# Llama-3.1-8B (HF config.json) fields, in llama3_jax.Config names.
LLAMA31_8B = dict(
    embed=4096, ffw_size=14336, q_heads=32, kv_heads=8, num_layers=32, head_dim=128,
    vocab_size=128256, rope_theta=500000.0, rope_scaling_factor=8.0,
    rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
    rope_scaling_original_max_position_embeddings=8192, causal=True)
TINY = dict(embed=128, ffw_size=256, q_heads=4, kv_heads=2, num_layers=2, head_dim=32, vocab_size=512)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:2000]}"


def import_peer(llama3_dir: str):
    """Imports llama3_jax.model / .configs from llama3_dir; returns (model, configs, shims)."""
    llama3_dir = os.path.abspath(llama3_dir)
    if not os.path.isfile(os.path.join(llama3_dir, "llama3_jax", "model.py")):
        raise FileNotFoundError(f"no llama3_jax/model.py under --llama3_dir={llama3_dir}")
    sys.path.insert(0, llama3_dir)
    shims = []
    try:
        import jax.experimental.array_serialization.pytree_serialization  # noqa: F401
    except ImportError as e:
        # Only the peer's save_pytree/load_pytree need it; a placeholder that fails if used.
        why = _one_line(e)
        name = "jax.experimental.array_serialization.pytree_serialization"
        for k in [k for k in sys.modules if k.startswith(name)]:
            del sys.modules[k]
        stub = types.ModuleType(name)

        def _unavailable(*_a, **_k):
            raise ImportError(f"{name} unavailable here ({why})")

        stub.save = stub.load = stub.load_pytreedef = _unavailable
        sys.modules[name] = stub
        shims.append(f"{name} -> placeholder ({why})")
    from llama3_jax import model as l3jax
    from llama3_jax import configs as l3configs
    if not os.path.abspath(l3jax.__file__).startswith(llama3_dir):
        raise ImportError(f"llama3_jax imported from {l3jax.__file__}, not from {llama3_dir}")
    return l3jax, l3configs, shims


def build_config(l3jax, l3configs, mesh, tiny: bool, quant: bool, max_seq_len: int):
    import jax.numpy as jnp
    base = l3configs.LLAMA3_8B
    mismatch = {k: (getattr(base, k), v) for k, v in LLAMA31_8B.items() if getattr(base, k) != v}
    if mismatch:
        raise ValueError(f"llama3_jax configs.LLAMA3_8B differs from Llama-3.1-8B: {mismatch}")
    cfg = dataclasses.replace(
        base, mesh=mesh, max_seq_len=max_seq_len, dtype=jnp.bfloat16,
        quant_layer=quant, quant_cache=quant,
        use_prefill_attn_kernel=False, use_decode_attn_kernel=False)  # as the preset (TPU-only kernels)
    if tiny:
        cfg = dataclasses.replace(cfg, **TINY)
    assert isinstance(cfg, l3jax.Config)
    return cfg


def main(argv):
    del argv
    result = {"ok": False, "peer": "jax-ml/jax-llm-examples llama3_jax (unmodified)",
              "argv": sys.argv[1:]}
    try:
        run(result)
        result["ok"] = True
    except Exception as e:  # one line, non-zero exit, no figure
        traceback.print_exc(file=sys.stderr)
        for k in ("ms_per_token", "ms_per_token_back_to_back", "tokens_per_s", "tokens_per_s_blocked"):
            result.pop(k, None)
        result["error"] = _one_line(e)
        _write_json(result)
        print(f"peer_jax_llm_examples FAILED: {_one_line(e)}", flush=True)
        sys.exit(1)
    _write_json(result)
    r = result
    print(f"peer llama3_jax decode | {r['model']} {r['weights_dtype']} batch={r['batch']} "
          f"cache={r['config']['max_seq_len']} positions {r['timed_positions'][0]}..{r['timed_positions'][1]} "
          f"| {r['device']} jax {r['jax_version']} | {r['ms_per_token']:.3f} ms/token (median of {r['steps']} "
          f"blocked steps) | {r['ms_per_token_back_to_back']:.3f} ms/step back-to-back = "
          f"{r['tokens_per_s']:.1f} tokens/s", flush=True)


def _write_json(result):
    if FLAGS.output_json:
        d = os.path.dirname(os.path.abspath(FLAGS.output_json))
        os.makedirs(d, exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {FLAGS.output_json}", flush=True)


def run(result):
    steps = FLAGS.steps if (FLAGS["steps"].present or not FLAGS.tiny) else 4
    batch, warmup, prompt_len, max_seq_len = FLAGS.batch, FLAGS.warmup, FLAGS.prompt_len, FLAGS.max_seq_len
    if FLAGS.tiny and not FLAGS["prompt_len"].present:
        prompt_len = 16
    if steps < 1 or batch < 1 or warmup < 2 or prompt_len < 1:
        raise ValueError("need steps >= 1, batch >= 1, warmup >= 2, prompt_len >= 1")
    if prompt_len + warmup + steps > max_seq_len:
        # The peer's cache is a ring of max_seq_len slots; stay below one lap so the figure is for
        # positions prompt_len .. prompt_len + warmup + steps.
        raise ValueError(f"prompt_len + warmup + steps = {prompt_len + warmup + steps} > max_seq_len {max_seq_len}")

    l3jax, l3configs, shims = import_peer(FLAGS.llama3_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import random
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    try:
        from jax.sharding import set_mesh
    except ImportError:  # jax < 0.7, as the peer's tests do
        from jax.sharding import use_mesh as set_mesh

    dev = jax.devices()[0]
    # One-device mesh with the peer's axis names / types (main.py, tests/test_model.py).
    mesh = jax.make_mesh((1, 1, 1), ("x", "y", "z"), devices=[dev], axis_types=(AxisType.Explicit,) * 3)
    cfg = build_config(l3jax, l3configs, mesh, FLAGS.tiny, FLAGS.quant, max_seq_len)
    with open(l3jax.__file__, "rb") as f:
        model_sha = hashlib.sha256(f.read()).hexdigest()
    result.update(
        model=("tiny" if FLAGS.tiny else "llama-3.1-8b-shape") + " (random weights)",
        weights_dtype="int8 (+bf16 scales), int8 KV cache" if FLAGS.quant else "bf16, bf16 KV cache",
        config={k: getattr(cfg, k) for k in (
            "embed", "ffw_size", "q_heads", "kv_heads", "num_layers", "head_dim", "vocab_size",
            "max_seq_len", "rope_theta", "rope_scaling_factor", "rope_scaling_low_freq_factor",
            "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings",
            "quant_layer", "quant_cache", "use_decode_attn_kernel")},
        batch=batch, steps=steps, warmup=warmup, prompt_len=prompt_len, fill=FLAGS.fill,
        jax_version=jax.__version__, jaxlib_version=getattr(jax.lib, "__version__", None) or
        __import__("jaxlib").__version__, python=platform.python_version(),
        device=f"{dev.platform}:{getattr(dev, 'device_kind', '?')}", device_count=jax.device_count(),
        mesh="(1,1,1) ('x','y','z') Explicit", llama3_dir=os.path.abspath(FLAGS.llama3_dir),
        llama3_model_py_sha256=model_sha, shims=shims,
        step_fn="llama3_jax.model.decode_step (its @jax.jit, donate cache) under set_mesh")
    print(f"[peer] jax {jax.__version__} on {result['device']}; cfg layers={cfg.num_layers} "
          f"embed={cfg.embed} vocab={cfg.vocab_size} cache={cfg.max_seq_len} quant={FLAGS.quant}; "
          f"shims={len(shims)}", flush=True)

    key = random.key(FLAGS.seed)
    k_w, k_c, k_t = random.split(key, 3)
    t0 = time.perf_counter()
    weights = l3jax.Weights.init(k_w, cfg)
    jax.block_until_ready(weights)
    leaves = jax.tree.leaves(weights)
    dtypes = sorted({str(x.dtype) for x in leaves})
    if not FLAGS.quant and dtypes != ["bfloat16"]:
        raise TypeError(f"expected bf16 weights, got dtypes {dtypes}")
    result["weight_bytes"] = int(sum(x.nbytes for x in leaves))
    result["weight_params"] = int(sum(x.size for x in leaves))
    result["weight_dtypes"] = dtypes
    print(f"[peer] Weights.init: {result['weight_params'] / 1e9:.3f} B params, "
          f"{result['weight_bytes'] / 2**30:.2f} GiB {dtypes} in {time.perf_counter() - t0:.1f}s", flush=True)

    decode_step = l3jax.decode_step

    def tokens0():
        toks = np.asarray(random.randint(k_t, (batch, 1), 1, cfg.vocab_size, dtype=jnp.int32))
        return jax.device_put(toks, NamedSharding(mesh, P(None, None)))  # as main.py's curr_tokens

    @jax.jit
    def _rand_like(k, x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return random.randint(k, x.shape, -127, 128, dtype=x.dtype)
        v = random.normal(k, x.shape, jnp.float32)
        return v.astype(x.dtype) if not FLAGS.quant else (jnp.abs(v) * 0.01).astype(x.dtype)

    def make_cache(phase: int):
        """The peer's KVCache with prompt_len positions filled; returns (cache, next tokens)."""
        cache = l3jax.KVCache.init(random.fold_in(k_c, phase), cfg, batch)
        if not l3jax.is_type(cache, l3jax.KVCache):
            raise TypeError(f"KVCache.init returned {type(cache)}")
        if FLAGS.fill == "random":
            bufs = jax.tree.leaves((cache.k, cache.v))
            keys = random.split(random.fold_in(k_c, 1000 + phase), len(bufs))
            new = [jax.device_put(_rand_like(kk, b), b.sharding) for kk, b in zip(keys, bufs)]
            k_new, v_new = jax.tree.unflatten(jax.tree.structure((cache.k, cache.v)), new)
            cache = dataclasses.replace(
                cache, k=k_new, v=v_new,
                iter=jax.device_put(jnp.asarray(prompt_len, cache.iter.dtype), cache.iter.sharding),
                starts=jax.device_put(jnp.zeros_like(cache.starts), cache.starts.sharding))
            return cache, tokens0()
        if FLAGS.fill == "decode":
            toks = tokens0()
            with set_mesh(cfg.mesh):
                for _ in range(prompt_len):
                    toks, cache = decode_step(toks, weights, cache, cfg)
            return cache, toks
        # prefill: its own function on a random prompt of prompt_len tokens (no pad id 0 in it)
        prompt = np.asarray(random.randint(random.fold_in(k_t, phase), (batch, prompt_len), 1,
                                           cfg.vocab_size, dtype=jnp.int32))
        with set_mesh(cfg.mesh):
            next_tokens, _, cache = l3jax.prefill(prompt, weights, cache, cfg)
            toks = next_tokens.at[:, cache.iter - 1: cache.iter].get(out_sharding=P(None, None))
        return cache, toks

    def cursor(cache):
        return int(np.asarray(cache.iter)), int(np.asarray(cache.fill_len()).max())

    # ---- phase 1: per-step, blocked --------------------------------------------------------------
    t0 = time.perf_counter()
    cache, toks = make_cache(0)
    it0, fill0 = cursor(cache)
    if FLAGS.fill != "prefill" and (it0, fill0) != (prompt_len, prompt_len):
        raise RuntimeError(f"cache cursor after fill is iter={it0} fill_len={fill0}, expected {prompt_len}")
    print(f"[peer] cache filled ({FLAGS.fill}): iter={it0} fill_len={fill0} in {time.perf_counter() - t0:.1f}s",
          flush=True)
    with set_mesh(cfg.mesh):
        t0 = time.perf_counter()
        for i in range(warmup):
            toks, cache = decode_step(toks, weights, cache, cfg)
            jax.block_until_ready((toks, cache))
            if i == 0:
                result["first_step_s_incl_compile"] = time.perf_counter() - t0
        n_compiled = decode_step._cache_size() if hasattr(decode_step, "_cache_size") else None
        per_step = []
        for _ in range(steps):
            t = time.perf_counter()
            toks, cache = decode_step(toks, weights, cache, cfg)
            jax.block_until_ready((toks, cache))
            per_step.append(time.perf_counter() - t)
    it1, fill1 = cursor(cache)
    if it1 != it0 + warmup + steps:
        raise RuntimeError(f"cache cursor advanced {it1 - it0}, expected {warmup + steps}")
    tok_np = np.asarray(toks)
    if tok_np.shape != (batch, 1) or tok_np.min() < 0 or tok_np.max() >= cfg.vocab_size:
        raise RuntimeError(f"bad output tokens shape={tok_np.shape} range=[{tok_np.min()},{tok_np.max()}]")
    del cache

    # ---- phase 2: back-to-back, one block ------------------------------------------------------
    cache, toks = make_cache(1)
    with set_mesh(cfg.mesh):
        for _ in range(warmup):
            toks, cache = decode_step(toks, weights, cache, cfg)
        jax.block_until_ready((toks, cache))
        t = time.perf_counter()
        for _ in range(steps):
            toks, cache = decode_step(toks, weights, cache, cfg)
        jax.block_until_ready((toks, cache))
        elapsed = time.perf_counter() - t
    it2, _ = cursor(cache)
    if it2 != it0 + warmup + steps:
        raise RuntimeError(f"back-to-back: cache cursor at {it2}, expected {it0 + warmup + steps}")
    n_compiled_after = decode_step._cache_size() if hasattr(decode_step, "_cache_size") else None
    if n_compiled is not None and n_compiled_after != n_compiled:
        raise RuntimeError(f"decode_step recompiled during timing ({n_compiled} -> {n_compiled_after})")
    del cache

    ms = sorted(1e3 * s for s in per_step)
    q = lambda p: ms[min(len(ms) - 1, int(round(p * (len(ms) - 1))))]
    result.update(
        ms_per_token=statistics.median(ms),
        ms_per_token_p10=q(0.10), ms_per_token_p90=q(0.90), ms_per_token_min=ms[0],
        tokens_per_s_blocked=1e3 * batch / statistics.median(ms),
        ms_per_token_back_to_back=1e3 * elapsed / steps,
        tokens_per_s=batch * steps / elapsed,
        timed_positions=[it0 + warmup, it1], decode_step_jit_cache_size=n_compiled_after,
        note=("ms_per_token: median wall time of one blocked decode_step (one token per sequence); "
              "tokens_per_s: batch*steps / wall time of steps dispatched back-to-back; random weights "
              "and cache, timing only."))


if __name__ == "__main__":
    app.run(main)
