"""The single-step programs of AR, SD and SSD, compiled alone: kernels per call and time.

Each program is one model step exactly as the engine runs it (the runner's forward over the
paged KV cache, then the greedy pick), compiled by itself so that its cost can be read
without the rest of a round around it:

  target_ar_step     the target, 1 new token per sequence (an AR step);
  target_ar_round    the engine's own AR round program (decoding/ar.py, one step): the
                     same step plus what a round adds (slots from the page table, stops,
                     the decode state), with its state donated like the others' carry;
  target_verify      the target, K+1 new tokens (SD / SSD verification);
  draft_step         the draft, 1 new token (one SD drafting step, the jit fallback);
  draft_glue         the draft, K+1 new tokens (SSD's glue decode);
  draft_tree_step    the draft, M = (K+1)*F branch tokens per sequence over the paged
                     context plus their scratch KV (one step of SSD's tree decode).

For each program and each XLA command-buffer mode (runner.COMMAND_BUFFER_MODES: "default",
"off" = every kernel launched by the host, "max" = loops/conditionals in CUDA graphs too)
it reports the kernels of one call (bench/probes/hlo_stats.py, from the optimized HLO) and
three times, all host-measured:

  ms            per call, `iters` calls queued back to back, then one wait (throughput);
  host_ms       per call, the host's share of that: how long queueing took. When host_ms
                is close to ms, the host launching kernels is the bottleneck (launch-bound);
  latency_ms    one call and a wait, median (what a round pays when it waits).

Used by bench/probes/ssd_timing.py (`--runs ...,steps`) and runnable alone:

  PYTHONPATH=$PWD python bench/probes/step_programs.py --target llama-3.1-8b \
      --draft llama-3.2-1b --draft_devices 1
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.probes.hlo_stats import kernel_counts
from ssd_jax.engine.runner import COMMAND_BUFFER_MODES, ModelRunner, slot_mapping
from ssd_jax.models.transformer import AttentionInputs, TreeScratch, init_tree_scratch
from ssd_jax.sharding.rules import TREE_SCRATCH_AXES, sharding_for

PROGRAMS = ("target_ar_step", "target_ar_round", "target_verify", "draft_step", "draft_glue",
            "draft_tree_step")


def _pages(batch: int, tokens: int, page_size: int):
  """A page table giving each sequence its own consecutive pages (page 0 unused)."""
  per_seq = -(-tokens // page_size)
  table = 1 + np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
  return table, 1 + batch * per_seq


def _decode_program(runner: ModelRunner, q: int):
  """One step of `q` new tokens per sequence at positions context..context+q-1."""
  ps = runner.page_size

  def step(params, carry, tokens, context, page_table):
    kv, _ = carry
    b = tokens.shape[0]
    positions = context[:, None] + jnp.arange(q, dtype=jnp.int32)[None, :]
    live = jnp.ones((b, 1), bool)
    attn = AttentionInputs(page_table=page_table,
                           slot_mapping=slot_mapping(page_table, positions, live, ps),
                           kv_limit=positions + 1)
    logits, kv, _ = runner.forward(params, kv, tokens, positions, attn)
    return kv, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return step


def _ar_round_program(runner: ModelRunner):
  """The engine's AR round (one greedy step), state in the carry, constants as inputs."""
  from ssd_jax.decoding.ar import ARMethod
  method = ARMethod(runner, tokenizer_decode=None, eos_ids=(), steps=1)

  def step(params, carry, consts):
    kv, state = carry
    kv, state, _, _ = method.step_fn(params, kv, state, consts, greedy=True)
    return kv, state

  return step


def _ar_round_carry(runner: ModelRunner, batch: int, context: int, page_table):
  from ssd_jax.engine.sampling import SamplingArrays
  from ssd_jax.engine.step import BatchConstants, DecodeState
  put = runner.put
  state = DecodeState(token=put(np.ones((batch,), np.int32)),
                      pos=put(np.full((batch,), context, np.int32)),
                      done=put(np.zeros((batch,), bool)),
                      generated=put(np.zeros((batch,), np.int32)))
  consts = BatchConstants(  # rows never stop: every call does a whole step
      page_table=put(page_table), max_new=put(np.full((batch,), 2 ** 30, np.int32)),
      eos_ids=put(np.full((1,), -1, np.int32)), ignore_eos=put(np.ones((batch,), bool)),
      sampling=jax.tree.map(put, SamplingArrays.from_params([None] * batch, batch)))
  return (_fresh_kv(runner), state), (consts,)


def _tree_program(runner: ModelRunner):
  """One tree-decode step: M branches per sequence, each at its own logical position,
  seeing the context up to its acceptance length plus its scratch KV slots."""
  def step(params, carry, kv, tokens, context, page_table, branch_a, tree_step):
    skv, _ = carry
    base = context[:, None] + branch_a + 1
    attn = AttentionInputs(page_table=page_table, slot_mapping=None, kv_limit=base)
    scratch = TreeScratch(kv=skv, step=tree_step)
    logits, _, scratch = runner.forward(params, kv, tokens, base + tree_step, attn,
                                        scratch=scratch)
    return scratch.kv, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return step


def _fresh_kv(runner: ModelRunner):
  """A pool of its own for one program (programs donate their pool through the carry)."""
  return jax.tree.map(jnp.zeros_like, runner.kv)


def build_programs(target: ModelRunner | None, draft: ModelRunner | None, *, batch: int,
                   k: int, f: int, context: int, names=PROGRAMS, suffix: str = "") -> dict:
  """name + suffix -> (runner, step, carry, inputs): `step(params, carry, *inputs) ->
  carry`; the carry (KV pool or tree scratch, and the picked tokens) is donated and fed
  back."""
  out = {}
  m = (k + 1) * f
  for runner, prefix in ((target, "target"), (draft, "draft")):
    if runner is None:
      continue
    page_table, needed = _pages(batch, context + m + k + 2, runner.page_size)
    if needed > runner.num_pages:
      raise ValueError(f"{prefix}: {needed} pages needed, the pool has {runner.num_pages}")
    put = runner.put
    ctx = put(np.full((batch,), context, np.int32))
    table = put(page_table)
    for q, name in ((1, "target_ar_step" if prefix == "target" else "draft_step"),
                    (k + 1, "target_verify" if prefix == "target" else "draft_glue")):
      if name in names:
        carry = (_fresh_kv(runner), put(np.zeros((batch, q), np.int32)))
        inputs = (put(np.ones((batch, q), np.int32)), ctx, table)
        out[name + suffix] = (runner, _decode_program(runner, q), carry, inputs)
    if prefix == "target" and "target_ar_round" in names:
      carry, inputs = _ar_round_carry(runner, batch, context, page_table)
      out["target_ar_round" + suffix] = (runner, _ar_round_program(runner), carry, inputs)
    if prefix == "draft" and "draft_tree_step" in names:
      scratch = init_tree_scratch(runner.cfg, batch, m, k, runner.kv_dtype)
      sh = sharding_for(runner.mesh, TREE_SCRATCH_AXES)
      carry = (jax.device_put(scratch.kv, sh), put(np.zeros((batch, m), np.int32)))
      branch_a = put(np.repeat(np.arange(k + 1, dtype=np.int32), f)[None].repeat(batch, 0))
      inputs = (_fresh_kv(runner), put(np.ones((batch, m), np.int32)), ctx, table,
                branch_a, put(np.int32(k // 2)))
      out["draft_tree_step" + suffix] = (runner, _tree_program(runner), carry, inputs)
  return out


def _time(compiled, params, carry, inputs, iters: int, latency_iters: int):
  carry = compiled(params, carry, *inputs)  # first call: allocations, graph capture
  jax.block_until_ready(carry)
  t0 = time.perf_counter()
  for _ in range(iters):
    carry = compiled(params, carry, *inputs)
  t1 = time.perf_counter()
  jax.block_until_ready(carry)
  t2 = time.perf_counter()
  lat = []
  for _ in range(latency_iters):
    s = time.perf_counter()
    carry = compiled(params, carry, *inputs)
    jax.block_until_ready(carry)
    lat.append(time.perf_counter() - s)
  return carry, {"ms": 1e3 * (t2 - t0) / iters, "host_ms": 1e3 * (t1 - t0) / iters,
                 "latency_ms": 1e3 * float(np.median(lat))}


def measure(programs: dict, modes=("default",), iters: int = 50, latency_iters: int = 20,
            log=print, hlo_dir: str | None = None) -> dict:
  """{name: {mode: {kernel counts..., ms, host_ms, latency_ms, compile_s}}}; a failing
  mode is reported as {"error": ...} and the others go on. With `hlo_dir`, each compiled
  program's optimized HLO is written there as <name>_<mode>.txt (read it with
  `hlo_stats.py --launches`)."""
  results = {}
  for name, (runner, step, carry, inputs) in programs.items():
    results[name] = {}
    for mode in modes:
      opts = COMMAND_BUFFER_MODES[mode]
      try:
        jitted = jax.jit(step, donate_argnums=(1,),
                         **({"compiler_options": opts} if opts else {}))
        t0 = time.perf_counter()
        compiled = jitted.lower(runner.params, carry, *inputs).compile()
        row = {"compile_s": time.perf_counter() - t0}
        if hlo_dir:
          os.makedirs(hlo_dir, exist_ok=True)
          with open(os.path.join(hlo_dir, f"{name}_{mode}.txt"), "w") as fh:
            fh.write(compiled.as_text())
        try:  # counting reads HLO text; if another XLA writes it differently, still time
          row.update(kernel_counts(compiled.as_text()))
        except Exception as e:  # noqa: BLE001
          row["count_error"] = f"{type(e).__name__}: {e}"[:200]
        carry, times = _time(compiled, runner.params, carry, inputs, iters, latency_iters)
        row.update(times)
        counts = (f"kernels {row['kernels']:5d} (gemms {row['gemms']:4d}, custom "
                  f"{row['custom_calls']:3d}, graphs {row['graphs']:3d})"
                  if "kernels" in row else "kernels ?")
        log(f"  {name:24s} {mode:8s} {counts}  {row['ms']:7.3f} ms/call  host "
            f"{row['host_ms']:6.3f}  latency {row['latency_ms']:7.3f}  "
            f"(compile {row['compile_s']:.1f}s)")
      except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        row = {"error": f"{type(e).__name__}: {e}"[:500]}
        log(f"  {name:24s} {mode:8s} failed: {row['error']}")
      results[name][mode] = row
    del carry
  return results


def programs_from_flags():
  """The programs the pair flags (define_pair_flags, --context, --programs) name, over
  random weights of real shapes; shared with kernel_timeline.py."""
  from absl import flags
  from ssd_jax.checkpoint import REAL_SHAPES, random_model
  from ssd_jax.kernels import resolve_impl
  from ssd_jax.sharding import MeshSpec, make_meshes
  F = flags.FLAGS
  tmesh, dmesh = make_meshes(MeshSpec.parse(F.mesh), F.draft_devices)
  impl = resolve_impl(F.attention)
  runners = []
  for name, mesh, seed in ((F.target, tmesh, 0), (F.draft, dmesh or tmesh, 1)):
    model = random_model(REAL_SHAPES[name], dtype=jnp.dtype(F.dtype), mesh=mesh,
                         seed=seed, attention_impl=impl)
    model.set_matmul_impl(F.matmul)
    pages = _pages(F.batch, F.context + (F.k + 1) * F.f + F.k + 2, 64)[1] + 1
    runners.append(ModelRunner(model, mesh, num_pages=pages, page_size=64, name=name))
  return build_programs(*runners, batch=F.batch, k=F.k, f=F.f, context=F.context,
                        names=tuple(F.programs))


def main(argv):
  del argv
  import json
  from absl import flags
  F = flags.FLAGS
  progs = programs_from_flags()
  res = measure(progs, tuple(F.command_buffers), F.iters, hlo_dir=F.hlo_dir)
  del progs
  if F.output_json:
    with open(F.output_json, "w") as fh:
      json.dump(res, fh, indent=1)


def define_pair_flags():
  """The flags naming a target/draft pair and its placement, shared with ssd_timing.py."""
  from absl import flags
  flags.DEFINE_string("target", "llama-3.1-8b", "REAL_SHAPES name of the target.")
  flags.DEFINE_string("draft", "llama-3.2-1b", "REAL_SHAPES name of the draft.")
  flags.DEFINE_string("mesh", "1x1", "Target mesh TxD.")
  flags.DEFINE_integer("draft_devices", 1, "Devices for the draft's own mesh.")
  flags.DEFINE_string("dtype", "bfloat16", "Weights and compute dtype.")
  flags.DEFINE_integer("k", 7, "Draft tokens per round.")
  flags.DEFINE_integer("f", 3, "SSD fan-out per acceptance length (tree width (K+1)*F).")
  flags.DEFINE_integer("batch", 1, "Sequences per batch.")
  flags.DEFINE_string("attention", "auto", "auto | xla | pallas.")
  flags.DEFINE_string("matmul", "xla", "The layers' weight products: xla | pallas | auto "
                      "(kernels.fused_matmul).")


if __name__ == "__main__":
  from absl import app, flags
  define_pair_flags()
  flags.DEFINE_integer("context", 192, "Tokens already in the cache.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Which programs.")
  flags.DEFINE_list("command_buffers", ["default", "off", "max"], "XLA command-buffer modes.")
  flags.DEFINE_integer("iters", 50, "Calls per timing.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  flags.DEFINE_string("hlo_dir", None, "Write each program's optimized HLO text here.")
  app.run(main)
