"""The harness's settings: one BenchConfig, filled from the command line's flags."""

from __future__ import annotations

import dataclasses
import functools
import types

from bench import roofline
from bench.datasets import prompt_sets
from bench.errors import BenchError
from bench.report import RANDOM_LABEL

METHODS = ("ar", "sd", "ssd")
ENGINES = ("ssd_jax", "tiny")


@dataclasses.dataclass
class BenchConfig:
  model: str | None = None
  draft: str | None = None
  methods: tuple[str, ...] = METHODS
  datasets: tuple[str, ...] = ("humaneval",)
  numseqs: int = 8
  output_len: int = 128
  batch_sizes: tuple[int, ...] = (1,)
  prompt_len: int | None = None       # fixed-length token-id prompts (truncate/repeat)
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = True
  k: int = 7
  f: int = 3
  fanout_hit: tuple[int, ...] | None = None
  fanout_miss: tuple[int, ...] | None = None
  fallback: str = "auto"              # jit | fast | auto (the engine picks by batch size)
  sampler_x: float | None = None
  mesh: str = "1x1"
  draft_devices: int = 0
  draft_devices_for: tuple[str, ...] = ("ssd",)
  dtype: str = "float32"
  max_model_len: int = 2048
  attention_impl: str = "auto"
  chat_template: str = "auto"         # auto (the dataset's kind) | on | off
  random_weights: bool = False
  ckpt_root: str = "/tmp/ssd_jax_random"
  profile: bool = False               # every run profiled (round split; adds syncs)
  split_pass: bool = True             # one extra profiled batch per method for the split
  split_pass_tokens: int | None = None  # None: --output_len (same shapes, no recompiles)
  warmup_generate: bool = False       # also generate the first batch untimed (primes the
                                      # prefix cache with a benchmark prompt: off by default)
  check_exact: bool = True
  bandwidth_gbps: float | None = None  # skip the measurement: the read ceiling, GB/s
  measure_bandwidth: bool = True
  engine: str = "ssd_jax"             # ssd_jax | tiny (in-memory tiny models, CPU dry run)
  output_json: str | None = None
  plot: str | None = None
  peer_json: str | None = None
  save_tokens: bool = True
  label: str = ""
  quiet: bool = False

  def validate(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad or not self.methods:
      raise BenchError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    bad = [d for d in self.datasets if d not in prompt_sets.DATASETS]
    if bad or not self.datasets:
      raise BenchError(f"--dataset: unknown {bad}; choose from "
                       f"{', '.join(prompt_sets.DATASETS)} (or --all)")
    if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
      raise BenchError(f"--batch_size must be positive integers, got {self.batch_sizes}")
    if self.numseqs < 1 or self.output_len < 1:
      raise BenchError("--numseqs and --output_len must be positive")
    if self.engine not in ENGINES:
      raise BenchError(f"--engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
    if self.chat_template not in ("auto", "on", "off"):
      raise BenchError(f"--chat_template: {self.chat_template!r} is not auto, on or off")
    if any(m in ("sd", "ssd") for m in self.methods) and self.engine != "tiny" \
        and self.draft is None and self.model is not None:
      raise BenchError("SD and SSD need --draft (a draft model path or, with "
                       "--random_weights, a shape name)")
    roofline.mesh_devices(self.mesh)
    roofline.dtype_bytes(self.dtype)


# ------------------------------------------------------------------------- command line

def define_flags(flag_values=None):
  """Defines the harness's flags on `flag_values` (default: absl's global FLAGS; tests
  pass their own FlagValues, so that other tools' flags of the same name do not clash)."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  F = types.SimpleNamespace(**{  # absl's DEFINE_* functions, defining on fv
      name: functools.partial(getattr(flags, name), flag_values=fv)
      for name in ("DEFINE_string", "DEFINE_list", "DEFINE_enum", "DEFINE_bool",
                   "DEFINE_integer", "DEFINE_float")})
  F.DEFINE_string("model", None, "target: HF dir, .gguf, or (with --random_weights) a shape "
                  "name such as llama-3.1-8b; default: the engine's embedded model")
  F.DEFINE_string("draft", None, "draft model (same forms as --model)")
  F.DEFINE_list("methods", list(METHODS), "methods to run: ar,sd,ssd")
  F.DEFINE_enum("dataset", "humaneval", list(prompt_sets.DATASETS), "prompt set")
  F.DEFINE_bool("all", False, "run every prompt set (unavailable ones are skipped, loudly)")
  F.DEFINE_integer("numseqs", 8, "prompts per dataset (the first N)")
  F.DEFINE_integer("output_len", 128, "new tokens per prompt")
  F.DEFINE_list("batch_size", ["1"], "batch sizes, e.g. 1,8")
  F.DEFINE_integer("prompt_len", None, "make every prompt exactly this many token ids")
  F.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy, exactness checked)")
  F.DEFINE_integer("top_k", 0, "top-k (0: off)")
  F.DEFINE_float("top_p", 1.0, "top-p")
  F.DEFINE_integer("seed", 0, "sampling seed")
  F.DEFINE_bool("ignore_eos", True, "generate exactly --output_len tokens")
  F.DEFINE_integer("k", 7, "speculation length K")
  F.DEFINE_integer("f", 3, "SSD fan-out F")
  F.DEFINE_list("fanout_hit", None, "SSD fan-out list after a hit (K+1 ints)")
  F.DEFINE_list("fanout_miss", None, "SSD fan-out list after a miss (K+1 ints)")
  F.DEFINE_enum("fallback", "auto", ["auto", "jit", "fast"],
                "SSD miss fallback (auto: the engine's choice by batch size)")
  F.DEFINE_float("sampler_x", None, "Saguaro cache-aware sampling factor")
  F.DEFINE_string("mesh", "1x1", "target mesh, e.g. 1x4")
  F.DEFINE_integer("draft_devices", 0, "devices of the draft's own mesh (0: share target's)")
  F.DEFINE_list("draft_devices_for", ["ssd"], "methods that get --draft_devices")
  F.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
  F.DEFINE_integer("max_model_len", 2048, "engine max_model_len")
  F.DEFINE_string("attention_impl", "auto", "engine attention_impl")
  F.DEFINE_enum("chat_template", "auto", ["auto", "on", "off"],
                "auto: on for chat-style sets (alpaca_like)")
  F.DEFINE_bool("random_weights", False, "random-weight checkpoints: results are labelled "
                f"'{RANDOM_LABEL}' and no speed-up is claimed")
  F.DEFINE_string("ckpt_root", "/tmp/ssd_jax_random", "where --random_weights writes")
  F.DEFINE_bool("only_write_checkpoints", False, "write the random checkpoints, print their "
                "directories, and exit")
  F.DEFINE_bool("profile", False, "profile every run (round split; adds syncs)")
  F.DEFINE_bool("split_pass", True, "after the timed runs, one profiled batch per method "
                "for the per-round split (profile mode switched on for that batch only)")
  F.DEFINE_integer("split_pass_tokens", None, "tokens of the profiled split pass (default "
                   "--output_len: other lengths may compile new shapes)")
  F.DEFINE_bool("warmup_generate", False, "an untimed generate of the first batch after "
                "warmup() (primes the prefix cache with that batch)")
  F.DEFINE_bool("check_exact", True, "at temperature 0, check SD/SSD == AR")
  F.DEFINE_float("bandwidth_gbps", None, "skip the measurement: use this read ceiling "
                 "(GB/s) for the roofline")
  F.DEFINE_bool("measure_bandwidth", True, "measure the read ceiling (and the copy "
                "bandwidth, reported beside it) for the roofline")
  F.DEFINE_enum("engine", "ssd_jax", list(ENGINES), "tiny: the real engine on tiny random "
                "in-memory models (a CPU dry run of the harness; needs --prompt_len)")
  F.DEFINE_string("output_json", None, "write the report here")
  F.DEFINE_string("plot", None, "write a PNG here (needs matplotlib)")
  F.DEFINE_string("peer_json", None, "include this peer_transformers JSON in the plot")
  F.DEFINE_bool("save_tokens", True, "keep generated token ids in the JSON")
  F.DEFINE_string("label", "", "free-form label for the report")
  return fv


def config_from_flags(FLAGS) -> BenchConfig:
  """The BenchConfig of parsed flags (those of define_flags)."""
  ints = lambda xs: tuple(int(x) for x in xs) if xs else None  # noqa: E731
  return BenchConfig(
      model=FLAGS.model, draft=FLAGS.draft, methods=tuple(m.strip().lower() for m in FLAGS.methods),
      datasets=tuple(prompt_sets.DATASETS) if FLAGS.all else (FLAGS.dataset,),
      numseqs=FLAGS.numseqs, output_len=FLAGS.output_len, batch_sizes=ints(FLAGS.batch_size),
      prompt_len=FLAGS.prompt_len, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos, k=FLAGS.k, f=FLAGS.f,
      fanout_hit=ints(FLAGS.fanout_hit), fanout_miss=ints(FLAGS.fanout_miss),
      fallback=FLAGS.fallback, sampler_x=FLAGS.sampler_x, mesh=FLAGS.mesh,
      draft_devices=FLAGS.draft_devices, draft_devices_for=tuple(FLAGS.draft_devices_for),
      dtype=FLAGS.dtype, max_model_len=FLAGS.max_model_len,
      attention_impl=FLAGS.attention_impl, chat_template=FLAGS.chat_template,
      random_weights=FLAGS.random_weights, ckpt_root=FLAGS.ckpt_root, profile=FLAGS.profile,
      split_pass=FLAGS.split_pass, split_pass_tokens=FLAGS.split_pass_tokens,
      warmup_generate=FLAGS.warmup_generate, check_exact=FLAGS.check_exact,
      bandwidth_gbps=FLAGS.bandwidth_gbps, measure_bandwidth=FLAGS.measure_bandwidth,
      engine=FLAGS.engine,
      output_json=FLAGS.output_json, plot=FLAGS.plot, peer_json=FLAGS.peer_json,
      save_tokens=FLAGS.save_tokens, label=FLAGS.label)
