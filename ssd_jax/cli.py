"""Command line: `python -m ssd_jax.launch [flags]`.

Runs AR, SD or SSD on prompts and prints the generations and metrics. With no --model it
uses the embedded SmolLM2-135M-Instruct (and, for sd/ssd, its distilled draft).

  python -m ssd_jax.launch --prompt "Write a Python function that checks primes."
  python -m ssd_jax.launch --method ssd --mesh 4x1 --draft-devices 1 --model DIR --draft DIR
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Target: HuggingFace dir or .gguf file (default: the "
                    "embedded SmolLM2-135M-Instruct).")
flags.DEFINE_string("draft", None, "Draft model dir/.gguf for sd/ssd (default with the "
                    "embedded target: the bundled distilled draft).")
flags.DEFINE_enum("method", "ar", ["ar", "sd", "ssd"], "Decoding method.")
flags.DEFINE_string("mesh", "1x1", "Target mesh TxD: T-way tensor parallel x D replicas.")
flags.DEFINE_integer("draft_devices", 0, "Devices after the target's for the draft's own "
                     "mesh (0: the draft shares the target's devices).")
flags.DEFINE_integer("k", 7, "Draft tokens per round (sd/ssd).")
flags.DEFINE_integer("f", 3, "SSD fan-out: recovery candidates per acceptance length.")
flags.DEFINE_string("fanout_hit", None, "SSD fan-out list after a cache hit, K+1 "
                    "comma-separated counts (default: f everywhere).")
flags.DEFINE_string("fanout_miss", None, "SSD fan-out list after a miss (same total).")
flags.DEFINE_enum("fallback", None, ["jit", "fast"], "SSD miss fallback (default: jit for "
                  "batch <= 4, fast above).")
flags.DEFINE_float("sampler_x", None, "SSD cache-aware sampling factor in (0, 1] applied to "
                   "the draft's top-F tokens (temperature > 0).")
flags.DEFINE_float("draft_temperature", None, "Draft sampling temperature (default: the "
                   "request's temperature).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past EOS.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Compute dtype (default: bfloat16 on GPU, float32 elsewhere).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "File with one prompt per line (or .jsonl with a "
                    "'prompt' field).")
flags.DEFINE_bool("chat_template", True, "Apply the tokenizer's chat template to prompts "
                  "(when it has one).")
flags.DEFINE_integer("batch_size", None, "Max sequences decoded together (default: the "
                     "number of prompts, at most 8; the KV page pool is sized by it).")
flags.DEFINE_integer("max_model_len", 2048, "Max prompt + generated tokens per sequence.")
flags.DEFINE_integer("page_size", 64, "KV cache page size (tokens).")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"], "Attention "
                  "implementation (auto: Pallas on GPU, XLA elsewhere).")
flags.DEFINE_bool("profile", False, "Time every round (blocks at round ends).")
flags.DEFINE_string("output_json", None, "Write prompts, token ids, texts and metrics here.")
flags.DEFINE_bool("quiet", False, "Do not print generations.")

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


class UsageError(ValueError):
  pass


def _read_prompts() -> list[str]:
  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    path = FLAGS.prompts_file
    if not os.path.isfile(path):
      raise UsageError(f"--prompts_file {path}: no such file")
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if path.endswith(".jsonl"):
          try:
            prompts.append(json.loads(line)["prompt"])
          except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--prompts_file {path}:{i}: expected a JSON object with a "
                             "'prompt' field") from None
        else:
          prompts.append(line)
    if not prompts:
      raise UsageError(f"--prompts_file {path} holds no prompts")
  return prompts or [DEFAULT_PROMPT]


def run() -> dict:
  from ssd_jax import LLM, SamplingParams
  prompts = _read_prompts()
  # The pool holds max_batch_size x max_model_len tokens of KV: for one prompt a pool for
  # eight would only cost memory and the time to zero it (876 MB, ~2 s on a small CPU).
  batch_size = FLAGS.batch_size or min(len(prompts), 8)
  llm = LLM(FLAGS.model, FLAGS.draft, method=FLAGS.method, mesh=FLAGS.mesh,
            draft_devices=FLAGS.draft_devices, dtype=FLAGS.dtype, k=FLAGS.k, f=FLAGS.f,
            fanout_hit=FLAGS.fanout_hit, fanout_miss=FLAGS.fanout_miss,
            fallback=FLAGS.fallback, sampler_x=FLAGS.sampler_x,
            draft_temperature=FLAGS.draft_temperature, max_batch_size=batch_size,
            max_model_len=FLAGS.max_model_len, page_size=FLAGS.page_size,
            attention_impl=FLAGS.attention, profile=FLAGS.profile)
  params = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                          max_new_tokens=FLAGS.max_new_tokens, stop=tuple(FLAGS.stop),
                          seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos)
  use_chat = FLAGS.chat_template and bool(getattr(llm.tokenizer, "chat_template", None))
  outs = llm.generate(prompts, params, chat_template=use_chat, progress=sys.stderr.isatty()
                      or len(prompts) > 1)
  m = llm.last_metrics
  if not FLAGS.quiet:
    for o in outs:
      print(f"### {o.prompt!r}\n{o.text}\n")
  summary = (f"[{m['method']}] {m['output_tokens']} tokens, {m['tokens_per_s']:.1f} tok/s "
             f"overall, decode {m['decode_tokens_per_s']:.1f} tok/s, TTFT "
             f"{1e3 * m['ttft_s']:.1f} ms, {m['num_rounds']} rounds ({m['round_ms']:.2f} ms)")
  if m.get("mean_accepted") is not None:
    summary += f", accepted {m['mean_accepted']:.2f}/round"
  if m.get("cache_hit_rate") is not None:
    summary += f", cache hits {100 * m['cache_hit_rate']:.1f}%"
  summary += f", compilations {m['total_compilations']}"
  print(summary)
  if FLAGS.profile:
    print("profile: " + ", ".join(f"{k}={v:.3f}" for k, v in m.items()
                                  if k.endswith("_ms")))
  result = {"flags": {k: FLAGS[k].value for k in ("model", "draft", "method", "mesh",
                                                  "draft_devices", "k", "f", "temperature",
                                                  "max_new_tokens", "dtype")},
            "metrics": m,
            "requests": [{"prompt": o.prompt, "prompt_token_ids": o.prompt_token_ids,
                          "token_ids": o.token_ids, "text": o.text,
                          "finish_reason": o.finish_reason, "metrics": o.metrics}
                         for o in outs]}
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; prompts go in --prompt", file=sys.stderr)
    return 2
  from ssd_jax.engine.pages import OutOfPagesError
  try:
    run()
  except (ValueError, OSError, OutOfPagesError) as e:
    # Boundary errors (bad flags, paths, meshes, checkpoints) are one clear line.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def entry():
  # absl spells multi-word flags with underscores; accept the dashed forms as well.
  argv = [a.replace("--draft-devices", "--draft_devices").replace(
      "--max-new-tokens", "--max_new_tokens") for a in sys.argv]
  app.run(main, argv=argv)


if __name__ == "__main__":
  entry()
