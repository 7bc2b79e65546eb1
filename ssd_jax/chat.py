"""`python -m ssd_jax.chat [engine flags]`: a multi-turn chat in the terminal.

The answer streams as it is generated (serve/engine.py's engine thread, the same path as
the server); after each answer one line: tokens, decode tok/s, TTFT and, for SD/SSD,
accepted tokens per round and (SSD) the speculation cache hit rate. `/reset` starts a new
conversation, `/quit` (or Ctrl-D) ends; Ctrl-C cancels the answer under way only.
"""

from __future__ import annotations

import sys

from absl import app, flags

from ssd_jax.serve.options import build_llm, dashed_argv, define_engine_flags

FLAGS = define_engine_flags(flags.FLAGS)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Top-p.")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens per answer.")
flags.DEFINE_string("system", None, "A system message to start every conversation.")

HELP = "/reset: new conversation, /quit: exit, Ctrl-C: cancel the answer"


def _prompt_ids(llm, messages: list[dict]) -> list[int]:
  tok = llm.tokenizer
  if getattr(tok, "chat_template", None):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  # No template (a base model): the conversation as plain text, one turn per line.
  return llm.encode("\n".join(m["content"] for m in messages) + "\n")


def metrics_line(req, out, method: str) -> str:
  seq = req.seq
  n = len(out.token_ids)
  ttft = (seq.t_first_token - req.t_arrival) if seq and seq.t_first_token else 0.0
  line = (f"[{n} tokens, decode {out.metrics['decode_tokens_per_s']:.1f} tok/s, "
          f"TTFT {1e3 * ttft:.0f} ms")
  acc = out.metrics.get("mean_accepted")
  if method != "ar" and acc is not None:
    line += f", accepted {acc:.2f}/round"
  hit = out.metrics.get("cache_hit_rate")
  if method == "ssd" and hit is not None:
    line += f", cache hits {100 * hit:.0f}%"
  return line + "]"


def _answer(engine, ids, params):
  """Streams one answer to stdout; returns (request, RequestOutput) or None if cancelled
  or failed."""
  from ssd_jax.serve.engine import QueueSink
  sink = QueueSink()
  req = engine.submit(ids, params, sink)
  events = sink.events()
  try:
    for kind, value in events:
      if kind == "text":
        sys.stdout.write(value)
        sys.stdout.flush()
      elif kind == "error":
        print(f"\nerror: {value}")
        return None
      else:
        print()
        return req, value
  except KeyboardInterrupt:
    req.cancel()  # the engine finishes it at its next round
    for _ in events:  # wait for that, so the next question starts on a free engine
      pass
    print("\n[cancelled]")
    return None


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  from ssd_jax import SamplingParams
  from ssd_jax.serve.engine import Engine
  try:
    # Checked before the model loads.
    SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                   seed=FLAGS.seed, max_new_tokens=FLAGS.max_new_tokens)
    llm = build_llm(FLAGS)
  except (ValueError, TypeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if llm.tokenizer is None:
    print("error: the model has no tokenizer; the chat needs text", file=sys.stderr)
    return 2
  if FLAGS.warmup:
    llm.warmup()
  engine = Engine(llm)
  system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  messages = list(system)
  print(f"ssd_jax chat ({FLAGS.method}); {HELP}")
  try:
    while True:
      try:
        line = input(">>> ")
      except KeyboardInterrupt:
        print()
        continue
      except EOFError:
        print()
        break
      text = line.strip()
      if not text:
        continue
      if text == "/quit":
        break
      if text == "/reset":
        messages = list(system)
        print("[new conversation]")
        continue
      if text.startswith("/"):
        print(f"unknown command {text.split()[0]}; {HELP}")
        continue
      ids = _prompt_ids(llm, messages + [{"role": "user", "content": text}])
      room = llm.max_model_len - len(ids)
      if room < 1:
        print(f"[the conversation is {len(ids)} tokens, max_model_len is "
              f"{llm.max_model_len}: /reset]")
        continue
      params = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                              top_k=FLAGS.top_k, seed=FLAGS.seed,
                              max_new_tokens=min(FLAGS.max_new_tokens, room))
      done = _answer(engine, ids, params)
      if done is None:
        continue  # cancelled: the turn is not part of the conversation
      req, out = done
      messages += [{"role": "user", "content": text},
                   {"role": "assistant", "content": out.text}]
      print(metrics_line(req, out, FLAGS.method))
  finally:
    engine.close()
  return 0


if __name__ == "__main__":
  app.run(main, argv=dashed_argv())
