"""The server under test, started by the load generator (`serve_load.py --launch "..."`), so
that one command measures one method: `python -m ssd_jax.serve <flags> --port N` in a
child process, ready once GET /health answers 200, stopped with SIGTERM (the server
finishes what is in flight and exits 0), killed only if it does not stop in time.

The child stays in the load generator's process group: `timeout` and Ctrl-C signal the
whole group, so the server cannot outlive an interrupted benchmark.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from bench.errors import BenchError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flag_value(argv: list, name: str) -> str | None:
  """The value of --name (or --name=...) in a flag list, dashes or underscores."""
  names = {"--" + name, "--" + name.replace("_", "-")}
  for i, a in enumerate(argv):
    key, eq, val = a.partition("=")
    if key in names:
      if eq:
        return val
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def model_vocab_size(argv: list) -> int | None:
  """vocab_size from the --model directory's config.json, if it has one (random-weight
  checkpoints do), so that token-id prompts stay inside the vocabulary."""
  model = flag_value(argv, "model")
  path = os.path.join(model, "config.json") if model else None
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("vocab_size")


class LaunchedServer:
  """`python -m ssd_jax.serve` with the given flags on 127.0.0.1 and a free port."""

  def __init__(self, flags: str, log_path: str, python: str = sys.executable):
    self.argv = shlex.split(flags)
    for bad in ("host", "port"):
      if flag_value(self.argv, bad) is not None:
        raise BenchError(f"--launch: leave out --{bad}; the load generator picks it")
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = log_path
    self.cmd = [python, "-m", "ssd_jax.serve", *self.argv, "--host", "127.0.0.1",
                "--port", str(self.port)]
    self.proc: subprocess.Popen | None = None
    self.exit_code: int | None = None
    self.ready_s: float | None = None

  def start(self) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                 else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    self._log = open(self.log_path, "w")
    self._log.write("$ " + shlex.join(self.cmd) + "\n")
    self._log.flush()
    self.t0 = time.perf_counter()
    self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                 env=env, cwd=_ROOT)

  async def wait_ready(self, client, timeout_s: float) -> None:
    """Polls GET /health; a server that exits or takes longer than timeout_s is a
    BenchError naming the last lines of its log."""
    end = time.perf_counter() + timeout_s
    while True:
      if self.proc.poll() is not None:
        self.exit_code = self.proc.returncode
        raise BenchError(f"the server exited with code {self.exit_code} before it was "
                         f"ready; its log ({self.log_path}) ends: {self.log_tail()}")
      try:
        r = await client.get(self.url + "/health", timeout=5)
        if r.status_code == 200:
          self.ready_s = time.perf_counter() - self.t0
          return
      except Exception:  # noqa: BLE001 - not listening yet
        pass
      if time.perf_counter() > end:
        raise BenchError(f"the server was not ready after {timeout_s:.0f}s; its log "
                         f"({self.log_path}) ends: {self.log_tail()}")
      await asyncio.sleep(0.5)

  def stop(self, timeout_s: float = 60.0) -> int | None:
    """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
    if self.proc is None:
      return None
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.exit_code = self.proc.returncode
    self._log.close()
    return self.exit_code

  def log_tail(self, n: int = 3) -> str:
    self._log.flush()
    try:
      with open(self.log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
      return "(no log)"
    return " | ".join(lines[-n:]) or "(empty)"

  def describe(self) -> dict:
    return {"command": shlex.join(self.cmd), "log": self.log_path, "ready_s": self.ready_s,
            "exit_code": self.exit_code}
