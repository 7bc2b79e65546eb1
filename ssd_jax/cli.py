"""Command line: `python -m ssd_jax.launch [flags]`.

Runs AR, SD or SSD on prompts and prints the generations and metrics. With no --model it
uses the embedded SmolLM2-135M-Instruct (and, for sd/ssd, its distilled draft).

  python -m ssd_jax.launch --prompt "Write a Python function that checks primes."
  python -m ssd_jax.launch --method ssd --mesh 4x1 --draft-devices 1 --model DIR --draft DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS  # the FlagValues define_flags() defined the flags on


def define_flags(fv: flags.FlagValues | None = None) -> flags.FlagValues:
  """Defines the command line's flags on `fv` (absl's global FLAGS by default) and makes
  them the ones this module reads. A function, not import-time definitions, so that a
  process that imports the CLI (tests) can still define other programs' flags."""
  global FLAGS
  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_string("model", None, "Target: HuggingFace dir or .gguf file (default: the "
                      "embedded SmolLM2-135M-Instruct).", flag_values=fv)
  flags.DEFINE_string("draft", None, "Draft model dir/.gguf for sd/ssd (default with the "
                      "embedded target: the bundled distilled draft).", flag_values=fv)
  flags.DEFINE_enum("method", "ar", ["ar", "sd", "ssd"], "Decoding method.", flag_values=fv)
  flags.DEFINE_string("mesh", "1x1", "Target mesh TxD: T-way tensor parallel x D replicas.",
                      flag_values=fv)
  flags.DEFINE_integer("draft_devices", 0, "Devices after the target's for the draft's own "
                       "mesh (0: the draft shares the target's devices).", flag_values=fv)
  flags.DEFINE_integer("k", 7, "Draft tokens per round (sd/ssd).", flag_values=fv)
  flags.DEFINE_integer("f", 3, "SSD fan-out: recovery candidates per acceptance length.",
                       flag_values=fv)
  flags.DEFINE_string("fanout_hit", None, "SSD fan-out list after a cache hit, K+1 "
                      "comma-separated counts (default: f everywhere).", flag_values=fv)
  flags.DEFINE_string("fanout_miss", None, "SSD fan-out list after a miss (same total).",
                      flag_values=fv)
  flags.DEFINE_enum("fallback", None, ["jit", "fast"], "SSD miss fallback (default: jit for "
                    "batch <= 4, fast above).", flag_values=fv)
  flags.DEFINE_float("sampler_x", None, "SSD cache-aware sampling factor in (0, 1] applied to "
                     "the draft's top-F tokens (temperature > 0).", flag_values=fv)
  flags.DEFINE_float("draft_temperature", None, "Draft sampling temperature (default: the "
                     "request's temperature).", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Top-p.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "PRNG seed: prompt i samples with seed + i (the same seed "
                       "gives the same tokens, whatever else is in the batch).",
                       flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.", flag_values=fv)
  flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).", flag_values=fv)
  flags.DEFINE_bool("ignore_eos", False, "Keep generating past EOS.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Compute dtype (default: bfloat16 on GPU, float32 elsewhere).", flag_values=fv)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).", flag_values=fv)
  flags.DEFINE_string("prompts_file", None, "File with one prompt per line (or .jsonl with a "
                      "'prompt' field).", flag_values=fv)
  flags.DEFINE_bool("chat_template", True, "Apply the tokenizer's chat template to prompts "
                    "(when it has one).", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Max sequences decoded together (default: the "
                       "number of prompts, at most 8).", flag_values=fv)
  flags.DEFINE_integer("max_model_len", 2048, "Max prompt + generated tokens per sequence.",
                       flag_values=fv)
  flags.DEFINE_integer("page_size", 64, "KV cache page size (tokens).", flag_values=fv)
  flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"], "Attention "
                    "implementation (auto: Pallas on GPU, XLA elsewhere).", flag_values=fv)
  flags.DEFINE_bool("profile", False, "Time every round (blocks at round ends).", flag_values=fv)
  flags.DEFINE_string("output_json", None, "Write prompts, token ids, texts and metrics here.",
                      flag_values=fv)
  flags.DEFINE_bool("quiet", False, "Do not print generations.", flag_values=fv)
  FLAGS = fv
  return fv

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."

# Flags only some methods read: given with another method they would be silently ignored.
_METHOD_FLAGS = {"draft": ("sd", "ssd"), "k": ("sd", "ssd"), "draft_temperature": ("sd", "ssd"),
                 "draft_devices": ("sd", "ssd"), "f": ("ssd",), "fanout_hit": ("ssd",),
                 "fanout_miss": ("ssd",), "fallback": ("ssd",), "sampler_x": ("ssd",)}
_RESULT_FLAGS = ("model", "draft", "method", "mesh", "draft_devices", "k", "f", "temperature",
                 "max_new_tokens", "dtype")


class UsageError(ValueError):
  pass


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised in the main thread: generation stops as on Ctrl-C and what had
  finished is kept (LLM.generate catches KeyboardInterrupt and its subclasses)."""


class _Interrupts:
  """Ctrl-C and SIGTERM raise KeyboardInterrupt / Terminated in the main thread. Python
  swallows an exception raised inside a gc callback or a __del__ ("Exception ignored
  in ..."), and JAX runs one at every garbage collection: such an interrupt is raised
  again a moment later (SIGALRM), outside it, so that it is never lost."""

  def __init__(self):
    self.pending: type[KeyboardInterrupt] | None = None

  def install(self) -> None:
    signal.signal(signal.SIGINT, self._on_signal)
    signal.signal(signal.SIGTERM, self._on_signal)
    signal.signal(signal.SIGALRM, self._again)
    self._hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable

  def _on_signal(self, signum, frame):
    self.pending = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    raise self.pending()

  def _unraisable(self, unraisable) -> None:
    if self.pending is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
      signal.setitimer(signal.ITIMER_REAL, 0.05)  # swallowed: raise it again, elsewhere
      return
    self._hook(unraisable)

  def _again(self, signum, frame):
    if self.pending is not None:
      raise self.pending()

  def caught(self) -> None:
    """main() has the interrupt: no more of them (a second one must not cut short the
    writing of what finished)."""
    self.pending = None
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, signal.SIG_IGN)


_INTERRUPTS = _Interrupts()


@contextlib.contextmanager
def _signals_deferred():
  """Holds Ctrl-C / SIGTERM back until the block is done: an interrupt in the middle of
  importing jaxlib's extension modules can crash the process (SIGSEGV / SIGABRT)."""
  sigs = {signal.SIGINT, signal.SIGTERM}
  signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# What an interrupt must not lose: filled by run() as it goes.
_RUN = {"num_prompts": 0, "outputs": None}


def _check_flags() -> None:
  for name, methods in _METHOD_FLAGS.items():
    flag = FLAGS[name]
    if flag.present and flag.value != flag.default and FLAGS.method not in methods:
      raise UsageError(f"--{name} is only used by --method {' or '.join(methods)}; drop it "
                       f"or choose that method (got --method {FLAGS.method})")
  if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
    raise UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")


def _check_text(text: str, where: str) -> None:
  """Command-line arguments that are not UTF-8 reach Python as lone surrogates, which no
  tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    code = ord(text[e.start])
    byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else "a lone surrogate"
    raise UsageError(f"{where} is not valid UTF-8 text ({byte} at character {e.start}); "
                     "pass UTF-8 text") from None


def _read_prompts() -> list:
  prompts = list(FLAGS.prompt)
  for i, p in enumerate(prompts, 1):
    _check_text(p, f"--prompt #{i}")
  if FLAGS.prompts_file:
    path = FLAGS.prompts_file
    if not os.path.isfile(path):
      raise UsageError(f"--prompts_file {path}: no such file")
    try:
      with open(path, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not text
        lines = f.read().split("\n")
    except UnicodeDecodeError as e:
      raise UsageError(f"--prompts_file {path}: not UTF-8 text (byte {e.object[e.start]:#04x} "
                       f"at offset {e.start}); save it as UTF-8") from None
    for i, line in enumerate(lines, 1):
      if not line.strip():
        continue
      where = f"--prompts_file {path}:{i}"
      if not path.endswith(".jsonl"):
        _check_text(line, where)
        prompts.append(line)
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        obj = None
      if not isinstance(obj, dict) or "prompt" not in obj:
        raise UsageError(f"{where}: expected a JSON object with a 'prompt' field")
      prompt = obj["prompt"]
      if isinstance(prompt, list) and prompt and all(
          isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts.append(prompt)  # token ids
        continue
      if not isinstance(prompt, str):
        raise UsageError(f"{where}: 'prompt' must be a string (or a list of token ids), got "
                         f"{json.dumps(prompt)[:40]}")
      _check_text(prompt, where)
      prompts.append(prompt)
    if not prompts:
      raise UsageError(f"--prompts_file {path} holds no prompts")
  return prompts or [DEFAULT_PROMPT]


def _check_output_json(path: str) -> None:
  """Refuses, before anything is generated, a path the results could not be written to."""
  if os.path.isdir(path):
    raise UsageError(f"--output_json {path} is a directory; give a file path")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UsageError(f"--output_json {path}: directory {parent} does not exist; create it "
                     "first")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise UsageError(f"--output_json {path} is not writable; fix its permissions or choose "
                     "another path")
  try:
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".ssd_jax-", suffix=".tmp")
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise UsageError(f"--output_json {path}: cannot create files in {parent} "
                     f"({e.strerror})") from None


def _write_json(path: str, result: dict) -> None:
  """Atomically: a temporary file in the same directory, then renamed over `path`, so an
  interrupted write never leaves half a file (nor destroys an older one)."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(result, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp makes 0600)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _request_record(i: int, o) -> dict:
  return {"index": i, "prompt": o.prompt, "prompt_token_ids": o.prompt_token_ids,
          "token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason,
          "metrics": o.metrics}


def _print_outputs(outs) -> None:
  for o in outs:
    label = repr(o.prompt) if o.prompt is not None else f"token ids {o.prompt_token_ids}"
    print(f"### {label}\n{o.text}\n")


def run() -> dict:
  _check_flags()
  prompts = _read_prompts()
  _RUN["num_prompts"] = len(prompts)
  if FLAGS.output_json:
    _check_output_json(FLAGS.output_json)
  with _signals_deferred():
    from ssd_jax import LLM, SamplingParams
  # Sampling parameters are checked before the model loads (which takes seconds).
  params = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                          max_new_tokens=FLAGS.max_new_tokens, stop=tuple(FLAGS.stop),
                          seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos)
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
  use_chat = FLAGS.chat_template and bool(getattr(llm.tokenizer, "chat_template", None))
  params = [dataclasses.replace(params, seed=FLAGS.seed + i) for i in range(len(prompts))]
  outs = llm.generate(prompts, params, chat_template=use_chat, progress=sys.stderr.isatty()
                      or len(prompts) > 1)
  _RUN["outputs"] = outs
  m = llm.last_metrics
  if not FLAGS.quiet:
    _print_outputs(outs)
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
  result = {"flags": {k: FLAGS[k].value for k in _RESULT_FLAGS},
            "metrics": m,
            "requests": [_request_record(i, o) for i, o in enumerate(outs)]}
  if FLAGS.output_json:
    _write_json(FLAGS.output_json, result)
  return result


def _interrupted(e: KeyboardInterrupt) -> int:
  """Ctrl-C or SIGTERM: keep what finished (printed, and in --output_json marked
  partial), say so in one line, exit 130 / 143."""
  _INTERRUPTS.caught()
  sys.stdout.flush()
  outputs = getattr(e, "outputs", None) or _RUN["outputs"] or []
  done = [(i, o) for i, o in enumerate(outputs) if o is not None]
  total = max(_RUN["num_prompts"], len(outputs))
  what, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
  if not FLAGS.quiet:
    _print_outputs([o for _, o in done])
  kept = "nothing to keep"
  if done:
    kept = "printed above" if not FLAGS.quiet else "not printed (--quiet)"
  if FLAGS.output_json:
    result = {"partial": True, "flags": {k: FLAGS[k].value for k in _RESULT_FLAGS},
              "metrics": {"num_requests": total, "num_finished": len(done),
                          "output_tokens": sum(len(o.token_ids) for _, o in done)},
              "requests": [_request_record(i, o) for i, o in done]}
    try:
      _write_json(FLAGS.output_json, result)
      kept = f"written to {FLAGS.output_json} (marked partial)"
    except OSError as err:
      kept = f"could not be written to {FLAGS.output_json} ({err})"
  print(f"interrupted ({what}): {len(done)} of {total} requests had finished; {kept}",
        file=sys.stderr)
  return code


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; prompts go in --prompt", file=sys.stderr)
    return 2
  from ssd_jax.engine.pages import OutOfPagesError
  try:
    run()
  except KeyboardInterrupt as e:
    return _interrupted(e)
  except (ValueError, OSError, OutOfPagesError) as e:
    # Boundary errors (bad flags, paths, meshes, checkpoints) are one clear line.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _parse_flags(argv):
  """absl's parsing, but a bad flag is an `error:` line and exit 2, like other bad input."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}; see --helpshort", file=sys.stderr)
    sys.exit(2)


def entry():
  # absl spells multi-word flags with underscores; accept the dashed forms as well.
  argv = [a.replace("--draft-devices", "--draft_devices").replace(
      "--max-new-tokens", "--max_new_tokens") for a in sys.argv]
  define_flags()
  _INTERRUPTS.install()
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code in (130, 143):
      # An interrupt that hit an import running code through C (PyRun_*) leaves CPython
      # marked as killed by Ctrl-C, handled or not: it would exit by SIGINT, not 130.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.code)
    raise
  except KeyboardInterrupt as e:  # before main() started (flag parsing, imports)
    _INTERRUPTS.caught()
    what, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
    print(f"interrupted ({what}) before anything was generated", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
  entry()
