"""Issue 18: bad input never hangs, never gives garbage with exit 0, never loses finished
work. Each case of the issue has a test here, asserting its one-line message: the CLI's
through absl flag parsing in-process (cli.main, no model is loaded) or a subprocess,
the API's directly. Models are tiny random ones; nothing loads the embedded model."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from safetensors.numpy import save_file

from ssd_jax import LLM, SamplingParams, cli
from ssd_jax.checkpoint import CheckpointError, load_model, write_random_hf_checkpoint

from engine_models import noisy_copy, tiny_config, tiny_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(page_size=16, max_model_len=32)


@pytest.fixture(scope="module")
def llm():
  return LLM(tiny_target(layers=1), method="ar", max_batch_size=2, **SMALL)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A tiny random HF checkpoint without a tokenizer (token-id prompts only)."""
  return write_random_hf_checkpoint(tiny_config(layers=1),
                                    str(tmp_path_factory.mktemp("ckpt") / "tiny"),
                                    dtype="float32")


CLI_FLAGS = cli.define_flags(flags.FlagValues())  # its own, beside other programs' flags


def _cli(*args, capsys):
  """Runs the CLI's main() in-process on these flags: (exit code, stderr)."""
  CLI_FLAGS.unparse_flags()
  CLI_FLAGS(["launch", *args])
  try:
    code = cli.main(["launch"])
  finally:
    CLI_FLAGS.unparse_flags()
  return code, capsys.readouterr().err


def _launch(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "ssd_jax.launch", *args], cwd=ROOT, env=env,
                        capture_output=True, timeout=timeout)


# -- 1. max_new_tokens=2.5 hung the host loop ---------------------------------------------
def test_sampling_params_check_types_and_values():
  for kw, exc, msg in [
      (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer, got 2.5"),
      (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an integer"),
      (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
      (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
      (dict(top_p=float("nan")), ValueError, "top_p must be a finite number"),
      (dict(top_k=1.5), TypeError, "top_k must be an integer"),
      (dict(seed=1.5), TypeError, "seed must be an integer"),
      (dict(stop=[""]), ValueError, "stop strings must be non-empty"),
      (dict(stop=[1]), TypeError, "stop must be a string or a list of strings"),
      (dict(ignore_eos="no"), TypeError, "ignore_eos must be True or False"),
  ]:
    with pytest.raises(exc, match=re.escape(msg)):
      SamplingParams(**kw)
  p = SamplingParams(max_new_tokens=np.int64(3), temperature=1, stop=["x"])
  assert type(p.max_new_tokens) is int and p.temperature == 1.0 and p.stop == ("x",)


def test_host_loop_finishes_what_the_device_stopped(llm):
  """Whatever the host believes, a sequence the device has stopped is finished: the host
  loop cannot wait for tokens that will never come (here a max_new_tokens of 2.5 slipped
  past the checks: the device stops at 2)."""
  bad = SamplingParams(max_new_tokens=3, ignore_eos=True)
  object.__setattr__(bad, "max_new_tokens", 2.5)

  def hang(signum, frame):
    raise TimeoutError("generate() hung")
  old = signal.signal(signal.SIGALRM, hang)
  signal.alarm(120)
  try:
    out = llm.generate([[5, 7]], bad)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert len(out[0].token_ids) == 2 and out[0].finish_reason == "length"


def test_cli_max_new_tokens_must_be_an_integer(capsys):
  r = _launch("--max_new_tokens", "2.5", timeout=120)  # absl's flag parsing refuses it
  assert r.returncode == 2 and r.stderr.decode().strip() == (
      "error: flag --max_new_tokens=2.5: invalid literal for int() with base 10: '2.5'; "
      "see --helpshort")
  code, err = _cli("--max_new_tokens", "0", capsys=capsys)
  assert code == 2 and "error: max_new_tokens must be >= 1, got 0" in err


# -- 2. NaN temperatures sampled garbage with exit 0 ----------------------------------------
def test_nan_temperature_is_refused(capsys):
  code, err = _cli("--temperature", "nan", capsys=capsys)
  assert code == 2 and err.strip() == "error: temperature must be a finite number, got nan"
  with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
    SamplingParams(temperature=float("nan"))


# -- 3. --output_json checked before generating, written atomically --------------------------
def test_output_json_is_checked_before_generating(tmp_path, capsys, monkeypatch):
  code, err = _cli("--output_json", str(tmp_path / "missing" / "o.json"), capsys=capsys)
  assert code == 2 and f"directory {tmp_path / 'missing'} does not exist" in err
  code, err = _cli("--output_json", str(tmp_path), capsys=capsys)
  assert code == 2 and f"--output_json {tmp_path} is a directory" in err
  ro = tmp_path / "ro.json"
  ro.write_text("{}")
  real_access = os.access  # as root every file is writable: pretend this one is not
  monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == str(ro)
                      else real_access(p, mode))
  code, err = _cli("--output_json", str(ro), capsys=capsys)
  assert code == 2 and f"--output_json {ro} is not writable" in err


def test_output_json_is_written_atomically(tmp_path):
  path = tmp_path / "o.json"
  path.write_text("old")
  cli._write_json(str(path), {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["o.json"]  # no temporary file left behind

  class Unserializable:
    pass
  with pytest.raises(TypeError):
    cli._write_json(str(path), {"a": Unserializable()})
  assert json.loads(path.read_text()) == {"a": 1}  # a failed write leaves the old file
  assert os.listdir(tmp_path) == ["o.json"]


# -- 4. .jsonl prompts that are not strings ---------------------------------------------------
def test_jsonl_prompts_must_be_strings_or_token_ids(tmp_path, capsys):
  nums = tmp_path / "nums.jsonl"
  nums.write_text('{"prompt": 5}\n{"prompt": 7}\n')
  code, err = _cli("--prompts_file", str(nums), capsys=capsys)
  assert code == 2
  assert f"--prompts_file {nums}:1: 'prompt' must be a string (or a list of token ids), " \
         "got 5" in err
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text('{"prompt": "hello"}\n{"prompt": 7}\n')
  code, err = _cli("--prompts_file", str(mixed), capsys=capsys)
  assert code == 2 and f"{mixed}:2: 'prompt' must be a string" in err
  ids = tmp_path / "ids.jsonl"
  ids.write_text('{"prompt": [5, 7]}\n{"prompt": "text"}\n')
  CLI_FLAGS(["launch", "--prompts_file", str(ids)])
  try:
    assert cli._read_prompts() == [[5, 7], "text"]
  finally:
    CLI_FLAGS.unparse_flags()


def test_generate_keeps_prompts_apart(llm):
  out = llm.generate([[5, 7], (8, 9, 10)], SamplingParams(max_new_tokens=2))
  assert [o.prompt_token_ids for o in out] == [[5, 7], [8, 9, 10]]


# -- 5. a checkpoint that is not the model its config describes --------------------------------
def test_checkpoint_tensors_the_config_does_not_describe(tmp_path, caplog):
  ckpt = write_random_hf_checkpoint(tiny_config(layers=2), str(tmp_path / "m"),
                                    dtype="float32")
  cfg_path = os.path.join(ckpt, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["num_hidden_layers"] = 1
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(CheckpointError, match=r"holds tensors for 2 layers \(up to "
                     r"model.layers.1\) but config.json says num_hidden_layers=1"):
    load_model(ckpt)

  ok = write_random_hf_checkpoint(tiny_config(layers=1), str(tmp_path / "ok"),
                                  dtype="float32")
  extra = os.path.join(ok, "extra.safetensors")

  def add(name):
    save_file({name: np.zeros(4, np.float32)}, extra)
  add("model.layers.0.self_attn.q_norm.weight")  # a Qwen3 tensor in a llama checkpoint
  with pytest.raises(CheckpointError, match="tensor model.layers.0.self_attn.q_norm.weight is "
                     "not part of a llama model"):
    load_model(ok)
  add("model.vision_tower.weight")
  with caplog.at_level(logging.WARNING, logger="ssd_jax"):
    load_model(ok)
  assert "ignoring 1 tensor(s) the model does not use: model.vision_tower.weight" in caplog.text


# -- 6. tracebacks instead of one line -----------------------------------------------------------
def test_engine_options_are_checked_before_loading():
  # The model paths do not exist: each error comes before anything is read.
  for kw, exc, msg in [
      (dict(page_size=0), ValueError, "page_size must be >= 1, got 0"),
      (dict(max_model_len=1.5), TypeError, "max_model_len must be an integer"),
      (dict(k=2.5, method="sd"), TypeError, "k (draft tokens per round) must be an integer"),
      (dict(method="sd", draft_temperature=-1), ValueError, "draft_temperature must be >= 0"),
      (dict(method="sd", draft_temperature=float("nan")), ValueError,
       "draft_temperature must be a finite number"),
      (dict(method="ssd", fanout_hit="zz"), ValueError, "fanout_hit 'zz' must be comma-"),
      (dict(method="ssd", f=0), ValueError, "f (fan-out per acceptance length) must be >= 1"),
      (dict(sampler_x=2.0), ValueError, "sampler_x must be in (0, 1]"),
      (dict(method="ar", draft="/nonexistent/draft"), ValueError,
       "a draft model needs method sd or ssd"),
      (dict(method="sd", draft="/nonexistent/draft"), ValueError,
       "/nonexistent/model: no such file or directory"),
  ]:
    with pytest.raises(exc, match=re.escape(msg)):
      LLM(kw.pop("model", "/nonexistent/model"), kw.pop("draft", None), **kw)
  with pytest.raises(CheckpointError, match="draft /nonexistent/draft: no such file"):
    LLM(tiny_target(layers=1), "/nonexistent/draft", method="sd", **SMALL)


def test_prompts_of_the_wrong_type(llm):
  ids = llm.generate(np.array([[5, 7]]), SamplingParams(max_new_tokens=2))
  assert ids[0].prompt_token_ids == [5, 7]
  assert llm.generate(np.array([5, 7]), SamplingParams(max_new_tokens=2))[0].token_ids == \
      ids[0].token_ids
  for prompts, exc, msg in [
      ([None], TypeError, "prompt 0 is NoneType: a prompt is a string or a list of token ids"),
      (None, TypeError, "prompts must be a string, a list of token ids, or a list of those"),
      ([[1.7, 2.2]], TypeError, "prompt 0: token id 1.7 at position 0 is not an integer"),
      ([1.7, 2.2], TypeError, "prompt 0: token id 1.7 at position 0 is not an integer"),
      ([[5, 7], [1, "a"]], TypeError, "prompt 1: token id 'a' at position 1"),
      (np.array([[1.5]]), TypeError, "2-D float64 array"),
      (b"hello", TypeError, "prompts are bytes; decode them to str"),
      (["a\udcff"], ValueError, "prompt 0 is not valid text"),
      ([[5, 10_000]], ValueError, "token ids must be in [0, 96), got 10000"),
  ]:
    with pytest.raises(exc, match=re.escape(msg)):
      llm.generate(prompts, SamplingParams(max_new_tokens=2))
  with pytest.raises(TypeError, match="params must be a SamplingParams or a list of them"):
    llm.generate([[5, 7]], {"max_new_tokens": 2})


def test_cli_usage_errors_before_the_model(tmp_path, capsys):
  """Each is refused by the CLI in-process before any model is loaded (none exists)."""
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "config.json").write_text("{}")
  for args, msg in [
      (["--page_size", "0"], "page_size must be >= 1, got 0"),
      (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
      (["--sampler_x", "0.5"], "--sampler_x is only used by --method ssd"),
      (["--fanout_hit", "zz"], "--fanout_hit is only used by --method ssd"),
      (["--method", "sd", "--f", "2"], "--f is only used by --method ssd"),
      (["--draft", "/nonexistent"], "--draft is only used by --method sd or ssd"),
      (["--k", "3"], "--k is only used by --method sd or ssd"),
      (["--method", "ssd", "--model", str(fake), "--draft", str(fake), "--fanout_hit", "zz"],
       "fanout_hit 'zz' must be comma-separated integers"),
      (["--method", "sd", "--model", str(fake), "--draft", str(fake),
        "--draft_temperature", "-1"], "draft_temperature must be >= 0, got -1.0"),
      (["--method", "sd", "--model", str(fake), "--draft", "/nonexistent/d"],
       "draft /nonexistent/d: no such file or directory"),
      (["--method", "ssd", "--model", str(fake), "--draft", str(fake), "--sampler_x", "3"],
       "sampler_x must be in (0, 1]"),
  ]:
    code, err = _cli(*args, capsys=capsys)
    assert code == 2, args
    assert err.startswith("error: ") and msg in err and len(err.splitlines()) == 1, err


def test_cli_non_utf8_prompt_is_one_line():
  r = _launch("--prompt", b"ab\xff\xfe", "--max_new_tokens", "2", timeout=120)
  err = r.stderr.decode()
  assert r.returncode == 2, err
  assert err.strip() == ("error: --prompt #1 is not valid UTF-8 text (byte 0xff at character "
                         "2); pass UTF-8 text")


# -- 9. smaller ones ----------------------------------------------------------------------------
def test_prompts_file_encoding(tmp_path, capsys):
  binary = tmp_path / "bin.txt"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
  code, err = _cli("--prompts_file", str(binary), capsys=capsys)
  assert code == 2 and f"--prompts_file {binary}: not UTF-8 text (byte 0x89 at offset 0)" in err
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
  CLI_FLAGS(["launch", "--prompts_file", str(bom)])
  try:
    assert cli._read_prompts() == ["first", "second"]
  finally:
    CLI_FLAGS.unparse_flags()


def test_progress_line_ends_at_the_final_count(llm, capsys):
  outs = llm.generate([[5, 7], [9]], SamplingParams(max_new_tokens=3, ignore_eos=True),
                      progress=True)
  err = capsys.readouterr().err
  assert sum(len(o.token_ids) for o in outs) == 6
  assert err.rstrip("\n").split("\r")[-1].startswith("  generated 6/6 tokens")
  assert err.endswith("done\n")


# -- 7. Ctrl-C / SIGTERM keep what finished -------------------------------------------------------
def test_interrupted_generate_keeps_finished_outputs(llm):
  """An interrupt when the third request joins the batch (after the first two left it):
  their outputs come back with the exception (and in llm.last_outputs), and the engine
  runs again afterwards, even when the interrupt lost the donated KV pool."""
  real = llm.decoding.update

  def update(state, plan, obs):
    if any(s.prompt_token_ids == [9, 10, 11] for _, s in plan.joins):
      for x in jax.tree.leaves(llm.target.kv):
        x.delete()  # as if interrupted after a dispatch, before its result was kept
      raise KeyboardInterrupt
    return real(state, plan, obs)
  llm.decoding.update = update
  try:
    with pytest.raises(KeyboardInterrupt) as info:
      llm.generate([[5, 7], [8], [9, 10, 11]], SamplingParams(max_new_tokens=3,
                                                               ignore_eos=True))
  finally:
    del llm.decoding.update
  outs = info.value.outputs
  assert [o is not None for o in outs] == [True, True, False]  # max_batch_size 2
  assert all(len(o.token_ids) == 3 for o in outs[:2])
  assert llm.last_outputs is outs
  assert llm.blocks.num_free == llm.blocks.num_pages
  again = llm.generate([[5, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))
  assert again[0].token_ids == outs[0].token_ids


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"),
                                           (signal.SIGTERM, 143, "SIGTERM")])
def test_cli_interrupt_writes_what_finished(tiny_ckpt, tmp_path, sig, code, name):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": [3 + i, 10 + i]}) + "\n"
                             for i in range(40)))
  out = tmp_path / "out.json"
  p = subprocess.Popen([sys.executable, "-m", "ssd_jax.launch", "--model", tiny_ckpt,
                        "--prompts_file", str(prompts), "--batch_size", "1",
                        "--max_new_tokens", "64", "--ignore_eos", "--quiet",
                        "--output_json", str(out)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  err = b""
  try:
    while True:  # wait until the first request has finished (64 tokens generated)
      chunk = os.read(p.stderr.fileno(), 4096)
      assert chunk, err.decode()[-2000:]
      err += chunk
      counts = re.findall(rb"generated (\d+)/", err)
      if counts and int(counts[-1]) > 64:
        break
    p.send_signal(sig)
    _, rest = p.communicate(timeout=120)
  finally:
    p.kill()
  err = (err + rest).decode()
  assert p.returncode == code, err[-2000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  m = re.fullmatch(rf"interrupted \({name}\): (\d+) of 40 requests had finished; written to "
                   rf"{re.escape(str(out))} \(marked partial\)", last)
  assert m, last
  data = json.loads(out.read_text())
  assert data["partial"] is True and data["metrics"]["num_finished"] == int(m.group(1)) >= 1
  assert [r["index"] for r in data["requests"]] == list(range(int(m.group(1))))
  assert all(len(r["token_ids"]) == 64 for r in data["requests"])
  assert sorted(os.listdir(tmp_path)) == ["out.json", "p.jsonl"]  # no temporary file left


# -- 10. a bounded, warmable set of compiled programs ---------------------------------------------
def _varied_traffic(llm, calls, seed=0):
  """Calls of 1-5 prompts, lengths and budgets anywhere in max_model_len, greedy and
  sampled, shared prefixes (prefix cache hits): the compilations of each call."""
  rng = random.Random(seed)
  base = [rng.randrange(1, 90) for _ in range(llm.max_model_len)]
  compiled = []
  for _ in range(calls):
    prompts, params = [], []
    for _ in range(rng.randint(1, 5)):
      new = rng.randint(1, 12)
      n = rng.randint(1, llm.max_model_len - new)
      prompts.append(base[:n] if rng.random() < 0.5 else [rng.randrange(1, 90)
                                                          for _ in range(n)])
      params.append(SamplingParams(max_new_tokens=new, temperature=rng.choice([0.0, 0.8]),
                                   seed=rng.randrange(100), ignore_eos=rng.random() < 0.5))
    llm.generate(prompts, params)
    compiled.append(llm.last_metrics["compilations"])
  return compiled


def test_warmup_compiles_every_bucket(capsys):
  llm = LLM(tiny_target(layers=1), method="ar", max_batch_size=2, **SMALL)
  b = llm.shape_buckets()
  assert b["batch"] == [1, 2] and b["table_widths"] == [1, 2]
  assert b["prefill_tokens"] == {1: [16], 2: [16, 32]}
  llm.warmup(all_buckets=True, progress=True)
  err = capsys.readouterr().err
  assert re.search(r"warmup: 34/34 shape sets, \d+ programs, [\d.]+ s, ~0 s left", err)
  assert llm.decoding.num_compilations() == b["programs"]
  assert _varied_traffic(llm, 12) == [0] * 12


def test_ssd_warmup_compiles_every_bucket():
  target = tiny_target(layers=1)
  llm = LLM(target, noisy_copy(target, 0.5), method="ssd", k=1, f=2, max_batch_size=2,
            page_size=64, max_model_len=32)
  b = llm.shape_buckets()
  assert b["batch"] == [1, 2] and b["table_widths"] == [1]
  assert b["prefill_tokens"] == {1: [16, 32]}
  llm.warmup(all_buckets=True)
  assert llm.decoding.num_compilations() == b["programs"]
  assert _varied_traffic(llm, 6, seed=1) == [0] * 6
