"""The command line: the main job runs on the embedded default, and bad input gives one
clear error line (exit code 2), never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from ssd_jax import LLM, SamplingParams
from ssd_jax.sharding import MeshError, MeshSpec, make_meshes

from engine_models import tiny_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "ssd_jax.launch", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_embedded_default_runs_and_writes_json(tmp_path):
  """The README's main command: AR on the embedded model, then SSD with its bundled
  draft, which must produce the very same tokens."""
  out = tmp_path / "out.json"
  r = _launch("--max_new_tokens", "12", "--output_json", str(out), "--quiet")
  assert r.returncode == 0, r.stderr[-2000:]
  data = json.loads(out.read_text())
  req = data["requests"][0]
  assert len(req["token_ids"]) == 12 and req["text"]
  assert data["metrics"]["tokens_per_s"] > 0 and data["metrics"]["ttft_s"] > 0
  assert "tok/s" in r.stdout
  out_ssd = tmp_path / "ssd.json"
  r = _launch("--method", "ssd", "--k", "4", "--f", "2", "--max_new_tokens", "12",
              "--output_json", str(out_ssd), "--quiet")
  assert r.returncode == 0, r.stderr[-2000:]
  ssd = json.loads(out_ssd.read_text())
  assert ssd["requests"][0]["token_ids"] == req["token_ids"]
  assert ssd["metrics"]["cache_hit_rate"] is not None


@pytest.mark.parametrize("args,message", [
    (["--mesh", "4"], "--mesh '4' is not of the form TxD"),
    (["--method", "sd", "--mesh", "4x1", "--draft-devices", "8"], "needs 12 devices but only 8"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--prompts_file", "/nonexistent.txt"], "--prompts_file /nonexistent.txt: no such file"),
    (["--method", "ssd", "--model", "/nonexistent/x"], "/nonexistent/x"),
    (["--method", "beam"], "method"),
    (["--k", "0", "--method", "sd"], "k (draft tokens per round) must be >= 1"),
])
def test_bad_input_is_one_clear_line(args, message):
  r = _launch(*args, timeout=300)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_api_errors_are_clear():
  target = tiny_target()
  with pytest.raises(ValueError, match="method 'beam' is unknown"):
    LLM(target, method="beam")
  with pytest.raises(ValueError, match="needs --draft"):
    LLM(target, method="sd")
  llm = LLM(target, method="ar", page_size=16, max_model_len=32)
  with pytest.raises(ValueError, match="exceeds max_model_len=32"):
    llm.generate([[1] * 30], SamplingParams(max_new_tokens=8))
  with pytest.raises(ValueError, match="text prompts need a tokenizer"):
    llm.generate(["hello"])
  with pytest.raises(ValueError, match="token ids must be in"):
    llm.generate([[1, 10_000]])
  with pytest.raises(ValueError, match="at least one token"):
    llm.generate([[]])
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    SamplingParams(temperature=-1)
  with pytest.raises(ValueError, match="fallback 'slow' is unknown"):
    LLM(target, target, method="ssd", fallback="slow", page_size=16, max_model_len=32)
  with pytest.raises(ValueError, match="sampler_x must be in"):
    LLM(target, target, method="ssd", sampler_x=2.0, page_size=16, max_model_len=32)


def test_mesh_errors():
  with pytest.raises(MeshError, match="not of the form TxD"):
    MeshSpec.parse("2y2")
  with pytest.raises(MeshError, match="needs 9 devices but only 8"):
    make_meshes(MeshSpec(tp=4, dp=2), draft_devices=1)
  # 4 heads / 2 kv heads cannot be split 8 ways.
  with pytest.raises(MeshError, match="not divisible by the tensor-parallel size 8"):
    LLM(tiny_target(), method="ar", mesh="8x1", page_size=16, max_model_len=32)
  target, draft = make_meshes(MeshSpec(tp=2, dp=2), draft_devices=2)
  assert set(target.devices.flat).isdisjoint(draft.devices.flat)


def test_a_failed_generate_leaves_nothing_queued():
  llm = LLM(tiny_target(), method="ar", page_size=16, max_model_len=128, num_pages=4)
  with pytest.raises(Exception, match="KV pages"):
    llm.generate([[1, 2], [3] * 70], SamplingParams(max_new_tokens=20))
  out = llm.generate([[5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True))
  assert len(out) == 1 and len(out[0].token_ids) == 3
