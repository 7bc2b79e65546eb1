"""Issue 15: streaming text, the engine thread (continuous batching) and the
OpenAI-compatible server, through the official `openai` client, on a tiny random
checkpoint with a word-level tokenizer (and a chat template). Temperature-0 answers must equal offline
LLM.generate; bad requests get their 4xx and the server keeps serving."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from ssd_jax import LLM, SamplingParams
from ssd_jax.engine.stream import TextStream
from ssd_jax.serve.app import build_app
from ssd_jax.serve.engine import Engine

from helpers import make_tiny_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny"
LIMIT = 64  # max_model_len
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}w3{% endif %}")
PROMPTS = ["w5 w6 w7", "w10 w11", "w20 w21 w22 w23 w24", "w40"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  from transformers import AutoTokenizer
  path = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("serve"), "llama", tokenizer=True)
  tok = AutoTokenizer.from_pretrained(path)
  tok.chat_template = TEMPLATE
  tok.save_pretrained(path)
  return path


class Server:
  """The app on uvicorn in a thread of this process, on a free port of 127.0.0.1."""

  def __init__(self, llm):
    self.engine = Engine(llm)
    config = uvicorn.Config(build_app(self.engine, NAME), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(10)


def _serve(ckpt, method):
  kw = dict(draft=ckpt, k=3) if method != "ar" else {}
  llm = LLM(ckpt, method=method, max_batch_size=8, max_model_len=LIMIT, page_size=16, **kw)
  params = SamplingParams(max_new_tokens=12)
  ref = {p: o for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}
  ref["chat"] = llm.generate([PROMPTS[0]], params, chat_template=True)[0]
  return Server(llm), ref


@pytest.fixture(scope="module")
def ar(ckpt):
  server, ref = _serve(ckpt, "ar")
  yield server, ref
  server.stop()


@pytest.fixture(scope="module")
def ssd(ckpt):
  server, ref = _serve(ckpt, "ssd")
  yield server, ref
  server.stop()


def _completion(client, prompt, stream=False, **kw):
  args = dict(model=NAME, prompt=prompt, temperature=0, **{"max_tokens": 12, **kw})
  if not stream:
    r = client.completions.create(**args)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage
  text, finish = [], None
  for chunk in client.completions.create(stream=True, **args):
    text.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
  return "".join(text), finish, None


@pytest.mark.parametrize("method", ["ar", "ssd"])
def test_completions_match_offline(method, request):
  server, ref = request.getfixturevalue(method)
  for prompt in PROMPTS[:2]:
    want = ref[prompt]
    text, finish, usage = _completion(server.client, prompt)
    assert (text, finish) == (want.text, want.finish_reason)
    assert usage.completion_tokens == len(want.token_ids)
    assert usage.prompt_tokens == len(want.prompt_token_ids)
    assert _completion(server.client, prompt, stream=True)[:2] == (want.text,
                                                                  want.finish_reason)


@pytest.mark.parametrize("method", ["ar", "ssd"])
def test_chat_match_offline(method, request):
  server, ref = request.getfixturevalue(method)
  msgs = [{"role": "user", "content": PROMPTS[0]}]
  r = server.client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12,
                                            temperature=0)
  assert r.choices[0].message.content == ref["chat"].text
  assert r.choices[0].message.role == "assistant"
  parts, usage = [], None
  for chunk in server.client.chat.completions.create(
      model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True,
      stream_options={"include_usage": True}):
    if chunk.usage is not None:
      usage = chunk.usage
    for c in chunk.choices:
      parts.append(c.delta.content or "")
  assert "".join(parts) == ref["chat"].text
  assert usage.completion_tokens == len(ref["chat"].token_ids)


def _free_pages_metric(server):
  text = httpx.get(server.url + "/metrics").text
  line = [x for x in text.splitlines() if x.startswith("ssd_jax_kv_free_pages ")][0]
  running = [x for x in text.splitlines() if x.startswith("ssd_jax_num_requests_running ")]
  return float(line.split()[1]), float(running[0].split()[1])


@pytest.mark.parametrize("method", ["ar", "ssd"])
def test_64_concurrent_requests(method, request):
  """64 requests at once, of mixed prompts and lengths, streamed and not, into a batch
  of 8: every one answered with its own text (temperature 0: what it is offline), none
  lost or mixed up; afterwards every page is free."""
  server, ref = request.getfixturevalue(method)
  decode = server.engine.llm._decode_text
  jobs = [(PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 9, i % 2 == 1) for i in range(64)]
  results = [None] * len(jobs)

  def one(i):
    prompt, n, stream = jobs[i]
    results[i] = _completion(server.client, prompt, stream=stream, max_tokens=n)[0]

  threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  want = []
  for prompt, n, _ in jobs:
    full = ref[prompt]  # 12 tokens; a shorter budget is its prefix (no EOS in these)
    want.append(decode(full.token_ids[:n]) if len(full.token_ids) >= n else full.text)
  assert results == want
  assert _free_pages_metric(server) == (float(server.engine.llm.blocks.num_pages), 0.0)


def test_disconnect_mid_stream_frees_pages(ar):
  """A client that goes away mid-stream: its sequence is aborted before the next round
  and its pages freed; the server serves on."""
  server, ref = ar
  body = dict(model=NAME, prompt=PROMPTS[0], max_tokens=48, temperature=0, stream=True,
              ignore_eos=True)
  with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        break  # one chunk, then hang up
  end = time.time() + 30
  while _free_pages_metric(server) != (float(server.engine.llm.blocks.num_pages), 0.0):
    assert time.time() < end, _free_pages_metric(server)
    time.sleep(0.05)
  metrics = httpx.get(server.url + "/metrics").text
  assert 'ssd_jax_requests_finished_total{reason="abort"}' in metrics
  assert _completion(server.client, PROMPTS[1])[0] == ref[PROMPTS[1]].text


def test_stop_string_never_streamed(ar):
  server, ref = ar
  want = ref[PROMPTS[2]]
  words = want.text.split()
  stop = " ".join(words[2:4])  # cuts the answer after its second word
  text, finish, _ = _completion(server.client, PROMPTS[2], stream=True, stop=[stop])
  assert (text, finish) == (want.text[:want.text.index(stop)], "stop")


def test_text_stream_holds_back():
  pieces = {1: "ab", 2: "c\ufffd", 3: "dST", 4: "OPx"}
  decode = lambda ids: "".join(pieces[i] for i in ids).replace("\ufffdd", "é")
  s = TextStream(decode, ["STOP"])
  assert s.update([1], False) == "ab"
  assert s.update([1, 2], False) == "c"        # incomplete UTF-8 held back
  assert s.update([1, 2, 3], False) == "é"     # "ST" could start "STOP"
  assert s.update([1, 2, 3, 4], True) == ""    # the stop string and past it: never sent


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    ({"model": NAME, "prompt": "w5", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "w5", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "w5", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": NAME, "prompt": " ".join(["w5"] * (LIMIT + 1))}, 400, "prompt"),
    ({"model": "gpt-5", "prompt": "w5"}, 404, "model"),
    ({"model": NAME, "prompt": "w5", "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": "w5", "temperature": -1}, 400, "temperature"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": NAME, "prompt": [5, 10 ** 6]}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_request(ar, body, status, param):
  server, ref = ar
  kw = {"content": body} if isinstance(body, bytes) else {"json": body}
  r = httpx.post(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                 timeout=30, **kw)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert err["param"] == param and err["message"] and "\n" not in err["message"]
  assert _completion(server.client, PROMPTS[1])[0] == ref[PROMPTS[1]].text


def test_models_and_health(ar):
  server, _ = ar
  assert [m.id for m in server.client.models.list()] == [NAME]
  assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_cli_one_turn(ckpt):
  """The terminal chat through a pty: one answer, then its metrics line."""
  import pty
  import select
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  fd, tty = pty.openpty()  # Popen, not pty.fork(): forking a process running JAX may hang
  proc = subprocess.Popen([sys.executable, "-m", "ssd_jax.chat", f"--model={ckpt}",
                           "--max_model_len=64", "--page_size=16", "--max_new_tokens=8",
                           "--nowarmup"], stdin=tty, stdout=tty, stderr=tty, env=env,
                          cwd=ROOT, start_new_session=True)
  os.close(tty)
  out = b""

  def read_until(marker: bytes, timeout: float):
    nonlocal out
    end = time.time() + timeout
    while marker not in out and time.time() < end:
      if select.select([fd], [], [], 0.5)[0]:
        try:
          out += os.read(fd, 4096)
        except OSError:
          break
    return marker in out

  try:
    assert read_until(b">>> ", 120), out.decode(errors="replace")
    os.write(fd, b"w5 w6\n")
    assert read_until(b"tok/s", 60), out.decode(errors="replace")
    assert b"TTFT" in out
    os.write(fd, b"/quit\n")
    assert proc.wait(30) == 0, out.decode(errors="replace")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    os.close(fd)


def test_cancel_finishes_the_sequence(ar):
  """A request cancelled while it runs is finished by the host loop at its next round
  (reason "abort"), not decoded to its max_new_tokens; the engine serves on."""
  server, ref = ar
  events = []
  req = None

  def sink(ev):
    events.append(ev)
    if ev[0] == "text":
      req.cancel()  # on the engine thread, right after the first text

  req = server.engine.submit(list(ref[PROMPTS[0]].prompt_token_ids),
                             SamplingParams(max_new_tokens=40, ignore_eos=True), sink)
  end = time.time() + 30
  while not events or events[-1][0] not in ("done", "error"):
    assert time.time() < end
    time.sleep(0.01)
  out = events[-1][1]
  assert out.finish_reason == "abort" and len(out.token_ids) < 40
  assert _completion(server.client, PROMPTS[1])[0] == ref[PROMPTS[1]].text
