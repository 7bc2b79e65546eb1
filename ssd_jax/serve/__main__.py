"""`python -m ssd_jax.serve [engine flags] --host 127.0.0.1 --port 8000`: the
OpenAI-compatible server (serve/app.py) on the engine thread (serve/engine.py; continuous
batching: requests join and leave the running batch between rounds).

  python -m ssd_jax.serve --method ssd            # the embedded SmolLM2 + its draft
  curl localhost:8000/v1/completions -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hi"}'
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

from absl import app, flags

from ssd_jax.serve.options import build_llm, dashed_argv, define_engine_flags, model_name

FLAGS = define_engine_flags(flags.FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: this machine only).")
flags.DEFINE_integer("port", 8000, "Port to bind.")
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the "
                    "--model directory's name).")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "uvicorn's.")
# A benchmark's load batches requests: compiling those shapes before serving keeps every
# compilation out of the measured latencies (bench/serve_load.py).
flags.DEFINE_list("warmup_batch_sizes", ["1"], "With --warmup: the batch sizes to compile.")
flags.DEFINE_integer("warmup_prompt_len", 16, "With --warmup: the prompt length to compile.")
flags.DEFINE_integer("warmup_max_tokens", 8, "With --warmup: the new tokens to compile for.")


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  import uvicorn
  from ssd_jax.serve.app import build_app
  from ssd_jax.serve.engine import Engine
  logging.basicConfig(level=logging.INFO)
  try:
    sizes = [int(b) for b in FLAGS.warmup_batch_sizes]
    if min(sizes, default=1) < 1:
      raise ValueError
  except ValueError:
    print(f"error: --warmup_batch_sizes must be integers >= 1, got "
          f"{','.join(FLAGS.warmup_batch_sizes)}", file=sys.stderr)
    return 2
  try:
    llm = build_llm(FLAGS)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if FLAGS.warmup:
    secs = sum(llm.warmup(batch_size=b, prompt_len=FLAGS.warmup_prompt_len,
                          max_new_tokens=FLAGS.warmup_max_tokens) for b in sizes)
    print(f"warmup: {secs:.1f} s (batch sizes {sizes})", file=sys.stderr)
  engine = Engine(llm)
  name = FLAGS.served_model_name or model_name(FLAGS)
  print(f"serving '{name}' ({FLAGS.method}) on http://{FLAGS.host}:{FLAGS.port}/v1",
        file=sys.stderr)
  config = uvicorn.Config(build_app(engine, name), host=FLAGS.host, port=FLAGS.port,
                          log_level=FLAGS.log_level)
  _Server(config).run()
  return 0


class _Server:
  """uvicorn's server: on SIGINT/SIGTERM it stops accepting, lets open requests finish,
  then the app's lifespan closes the engine. uvicorn re-raises the signal after that
  (exit 143); a server told to stop that stopped cleanly exits 0 instead."""

  def __new__(cls, config):
    import uvicorn

    class Server(uvicorn.Server):
      @contextlib.contextmanager
      def capture_signals(self):
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
          yield
        finally:
          for s, h in old.items():
            signal.signal(s, h)

    return Server(config)


if __name__ == "__main__":
  app.run(main, argv=dashed_argv())
