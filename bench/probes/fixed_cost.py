"""The fixed cost per program, measured end to end: AR decode through `LLM.generate` at
real shapes (random weights), against the read-bandwidth floor measured in the same process.

For each model (a REAL_SHAPES name), batch size and variant it reports, per decode step of
one sequence:

  ms          decode time / generated tokens per sequence (what a user waits per token);
  host_ms     the host's time to dispatch a round (trace_host, no synchronisation added)
              divided by the steps in it: a step is host-bound when this is near `ms`;
  floor_ms    bytes a step must read (every weight once, the input embedding one row per
              sequence, plus the KV it attends to) / the read ceiling;
  ratio       floor_ms / ms (1.0: at the read floor).

The read ceiling and the copy figure beside it are bench/roofline.py's (calls queued back
to back); the copy figure is labelled and never used as the floor.
Variants are `rows<R>_steps<S>[_cb<MODE>][_pg<P>]`: steps of fewer than R tokens padded to
R rows (LLM(min_step_rows=R)), S decode steps per AR round (LLM(ar_steps=S)), with `_cb`,
XLA's command buffers (CUDA graphs) in MODE (LLM(command_buffers=MODE): off, max), and
with `_pg`, KV pages of P tokens (default 64; at 256 a 128 + 128-token sequence never
needs a new page while it decodes, so the batch's constants are never replaced).

  PYTHONPATH=$PWD python bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b,smollm2-135m \
      --batches 1,8 --variants rows1_steps1,rows8_steps1,rows8_steps4 --output_json out.json
"""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_list("models", ["llama-3.1-8b", "llama-3.2-1b", "smollm2-135m"],
                  "REAL_SHAPES names.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("variants", ["rows1_steps1", "rows8_steps1", "rows8_steps4"],
                  "rows<R>_steps<S>[_cb<MODE>]: pad steps to R rows, S AR steps per "
                  "round, XLA command buffers in MODE.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 2, "Timed generate calls per point (the best is kept).")
flags.DEFINE_float("read_gb", 8.6, "Size of the array the read ceiling reduces (GB).")
flags.DEFINE_string("dtype", "bfloat16", "Weights and compute dtype.")
flags.DEFINE_string("attention", "auto", "auto | xla | pallas.")
flags.DEFINE_string("matmul", "xla", "The layers' weight products: xla | pallas | auto.")
flags.DEFINE_string("output_json", None, "Write the results here.")
FLAGS = flags.FLAGS


def step_bytes(cfg, batch: int, context: float, itemsize: int) -> float:
  """Bytes one decode step must read: every weight once, one embedding row per sequence
  (an untied table is gathered, not read), the KV of `context` tokens per sequence."""
  e, m, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  h, kv, d, v = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  per_layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * m + 2 * e
  weights = layers * per_layer + e + v * e  # + final norm + output projection
  if not cfg.tie_word_embeddings:
    weights += batch * e
  kv_bytes = batch * context * layers * 2 * kv * d
  return (weights + kv_bytes) * itemsize


def run_point(model, cfg, batch: int, variant: str) -> dict:
  from ssd_jax import LLM, SamplingParams
  m = re.fullmatch(r"rows(\d+)_steps(\d+)(?:_cb([a-z]+))?(?:_pg(\d+))?", variant)
  if m is None:
    raise ValueError(f"variant {variant!r} is not rows<R>_steps<S>[_cb<MODE>][_pg<P>]")
  rows, steps, command_buffers = int(m.group(1)), int(m.group(2)), m.group(3)
  page_size = int(m.group(4) or 64)
  llm = LLM(model, method="ar", max_batch_size=batch, min_step_rows=rows, ar_steps=steps,
            command_buffers=command_buffers,
            max_model_len=FLAGS.prompt_len + FLAGS.new_tokens + 64, page_size=page_size,
            attention_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(1, cfg.vocab_size, FLAGS.prompt_len)))
             for _ in range(batch)]
  params = SamplingParams(max_new_tokens=FLAGS.new_tokens, ignore_eos=True)
  llm.generate(prompts, params)  # compile
  best = None
  for _ in range(FLAGS.repeats):
    llm.reset_prefix_cache()
    llm.generate(prompts, params)
    m = llm.last_metrics
    if best is None or m["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
      best = m
  llm.trace_host = True
  llm.reset_prefix_cache()
  llm.generate(prompts, params)
  traced = llm.last_metrics
  ms = 1e3 * batch / best["decode_tokens_per_s"]
  return {"model": None, "batch": batch, "variant": variant, "ms": ms,
          "round_ms": best["round_ms"], "host_ms": traced.get("host_round_ms", 0.0) / steps,
          # between rounds (joins, pages grown): the host's time per update, median of a run
          "host_update_ms": traced.get("host_update_ms", 0.0),
          "compilations_after_warmup": best["compilations"] + traced["compilations"]}


def main(argv):
  del argv
  from ssd_jax.checkpoint import REAL_SHAPES, random_model
  dev = jax.devices()[0]
  res = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%d"), "flags": {k: FLAGS[k].value for k in (
             "models", "batches", "variants", "prompt_len", "new_tokens", "dtype",
             "attention", "matmul")}}
  from bench import roofline
  res["read_TBps"] = roofline.measure_read_bandwidth(int(FLAGS.read_gb * 1e9))[
      "bandwidth_Bps"] / 1e12
  res["copy_TBps"] = roofline.measure_copy_bandwidth()["bandwidth_Bps"] / 1e12
  read = res["read_TBps"] * 1e12
  print(f"read ceiling {res['read_TBps']:.2f} TB/s (copy, read + written: "
        f"{res['copy_TBps']:.2f} TB/s)", flush=True)
  rows = []
  itemsize = jnp.dtype(FLAGS.dtype).itemsize
  for name in FLAGS.models:
    cfg = REAL_SHAPES[name]
    model = random_model(cfg, dtype=jnp.dtype(FLAGS.dtype))
    for b in map(int, FLAGS.batches):
      floor_ms = 1e3 * step_bytes(cfg, b, FLAGS.prompt_len + FLAGS.new_tokens / 2,
                                  itemsize) / read
      for variant in FLAGS.variants:
        try:
          row = run_point(model, cfg, b, variant)
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
          row = {"batch": b, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}
          print(f"{name} b={b} {variant}: failed: {row['error']}", flush=True)
          rows.append({**row, "model": name})
          continue
        row.update(model=name, floor_ms=floor_ms, ratio=floor_ms / row["ms"])
        rows.append(row)
        print(f"{name:14s} b={b:<2d} {variant:18s} {row['ms']:7.3f} ms/step  host "
              f"{row['host_ms']:6.3f}  update {row['host_update_ms']:6.2f}  "
              f"floor {floor_ms:6.3f}  ratio {row['ratio']:.2f}  "
              f"compilations after warm-up {row['compilations_after_warmup']}", flush=True)
        if FLAGS.output_json:
          with open(FLAGS.output_json, "w") as f:
            json.dump({**res, "rows": rows}, f, indent=1)
    del model
  res["rows"] = rows
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
