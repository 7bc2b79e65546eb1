"""Draft distillation command line: `python -m ssd_jax.distill --mode=... [flags]`.

Modes:
  train     distil a draft from a target (default); optionally export it as a HuggingFace
            dir (--out_dir), write its non-embedding weights (--layers_out), and evaluate.
  eval      held-out KL / top-1 agreement and the greedy acceptance estimate of an
            exported draft (--draft) against the target.
  tokenize  stream the offline corpus through the target tokenizer into a flat token file
            (.u16 or .i32), for machines without the tokenizer or the corpus.
  prompts   write token-id prompt sets (HumanEval raw and chat-templated; self-generation
            prompts from the training split) to a JSON file.

The repeatable recipe for the default SmolLM2 draft is in bench/DISTILL.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", ["train", "eval", "tokenize", "prompts"], "What to do.")
flags.DEFINE_string("target", "", "Target model: HF dir or .gguf; empty = embedded "
                    "SmolLM2-135M-Instruct; 'random:tiny' / 'random:smollm2' = random weights "
                    "of a tiny / SmolLM2-135M shape (smoke tests, rehearsals).")
flags.DEFINE_string("tokenizer", "", "Tokenizer path (default: the target's).")
flags.DEFINE_string("dtype", "auto", "Target dtype: auto (bfloat16 on GPU, float32 on CPU), "
                    "bfloat16 or float32.")
# draft architecture
flags.DEFINE_integer("draft_layers", 4, "Draft decoder layers.")
flags.DEFINE_integer("draft_hidden", 0, "Draft hidden size (0 = target's).")
flags.DEFINE_integer("draft_intermediate", 0, "Draft MLP size (0 = target's).")
flags.DEFINE_integer("draft_heads", 0, "Draft attention heads (0 = target's).")
flags.DEFINE_integer("draft_kv_heads", 0, "Draft KV heads (0 = target's).")
flags.DEFINE_string("draft_model_type", "", "llama or qwen3 (default: target's).")
flags.DEFINE_bool("init_from_target", False, "Start from the target's embeddings, first "
                  "draft_layers layers and final norm (needs the target's width and heads).")
flags.DEFINE_bool("freeze_embeddings", True, "Keep the draft's embeddings equal to the "
                  "target's (not trained).")
# data
flags.DEFINE_string("corpus", "installed", "'installed' (stdlib + site-packages text, "
                    "streamed and tokenised on the fly) or a token file from --mode=tokenize.")
flags.DEFINE_string("heldout_corpus", "", "Held-out token file (with a token-file corpus).")
flags.DEFINE_float("heldout_frac", 0.01, "Fraction of documents held out (installed corpus).")
flags.DEFINE_integer("shuffle_buffer", 64, "Documents in the streaming shuffle buffer.")
flags.DEFINE_string("prompts_file", "", ".npz from --mode=prompts (token-id prompt sets).")
flags.DEFINE_integer("self_gen", 0, "Target greedy generations to add to the training data "
                     "(prompts: the file's 'self_gen' set, else built from the corpus).")
flags.DEFINE_integer("self_gen_tokens", 256, "Max new tokens per self-generated sample.")
flags.DEFINE_float("self_gen_mix", 0.5, "Fraction of each batch's rows from self-generated data.")
flags.DEFINE_integer("gen_batch", 64, "Batch size for self-generation.")
flags.DEFINE_float("self_gen_seconds", 0, "Stop self-generation after this many seconds "
                   "(0 = generate for every prompt).")
flags.DEFINE_integer("eval_gen_batch", 64, "Batch size for the evaluation's generation.")
# optimisation
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_integer("steps", 1000, "Train steps (the LR schedule spans them); 0 = as many "
                     "as fit --time_budget_s (fixed after --calib_steps timed steps).")
flags.DEFINE_integer("calib_steps", 10, "Timed steps before an automatic run length is fixed.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW, warmup then cosine).")
flags.DEFINE_integer("warmup", 50, "Warmup steps.")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (matrices only).")
flags.DEFINE_float("clip", 1.0, "Global gradient-norm clip.")
flags.DEFINE_string("compute_dtype", "auto", "Draft compute dtype (f32 master weights): "
                    "auto = the target's dtype.")
flags.DEFINE_integer("seed", 0, "Seed (draft init, data order).")
flags.DEFINE_integer("log_every", 10, "Progress line every N steps.")
flags.DEFINE_string("ckpt_dir", "", "Orbax checkpoint directory ('' = none).")
flags.DEFINE_integer("ckpt_every", 200, "Checkpoint every N steps.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --ckpt_dir.")
flags.DEFINE_float("time_budget_s", 0, "Training ends by this many seconds after start-up "
                   "(loading and self-generation included; evaluation not); 0 = off.")
flags.DEFINE_float("stop_after_s", 0, "End this process's training (with a checkpoint) at the "
                   "first progress line past this many seconds; the run length is unchanged "
                   "and --resume goes on (for machines whose calls are time-capped).")
# outputs
flags.DEFINE_enum("layers_dtype", "bfloat16", ["bfloat16", "int8"], "Storage of --layers_out: "
                  "bf16, or int8 in blocks of 32 with a scale each (half the size; the "
                  "evaluation then measures the int8 round-tripped draft, i.e. what ships).")
flags.DEFINE_string("out_dir", "", "Export the draft as a HuggingFace dir here.")
flags.DEFINE_string("layers_out", "", "Write the draft's non-embedding weights here "
                    "(draft_layers*.safetensors + draft.json), the repo format of a default "
                    "draft.")
flags.DEFINE_integer("layers_shard_mb", 15, "Max MB per draft_layers shard.")
# evaluation
flags.DEFINE_string("draft", "", "Draft to evaluate (--mode=eval): HF dir; empty = the "
                    "default draft for the embedded target.")
flags.DEFINE_bool("eval", True, "Evaluate after training.")
flags.DEFINE_integer("eval_batches", 8, "Held-out batches for KL / top-1.")
flags.DEFINE_string("eval_sets", "humaneval", "Comma-separated prompt sets for the acceptance "
                    "estimate: humaneval, humaneval_chat (or any set of --prompts_file).")
flags.DEFINE_integer("eval_prompts", 164, "Max prompts per set.")
flags.DEFINE_integer("eval_max_new", 128, "Target greedy tokens per prompt.")
flags.DEFINE_string("eval_ks", "4,7", "Draft lengths K for the acceptance estimate.")
flags.DEFINE_string("eval_json", "", "Write the metrics here.")
# tokenize / prompts modes
flags.DEFINE_string("tokens_out", "", "Token file to write (--mode=tokenize): .u16 or .i32.")
flags.DEFINE_integer("max_tokens", 10_000_000, "Tokens to write (--mode=tokenize).")
flags.DEFINE_float("tokenize_seconds", 0, "Stop tokenising after this long (0 = off).")
flags.DEFINE_enum("split", "train", ["train", "heldout"], "Corpus split (--mode=tokenize).")
flags.DEFINE_string("prompts_out", "", ".npz to write (--mode=prompts).")
flags.DEFINE_integer("num_self_gen_prompts", 4096, "Self-generation prompts (--mode=prompts).")


def log(msg: str) -> None:
  print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _dtype(name: str):
  import jax
  import jax.numpy as jnp
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  return jnp.dtype(name)


RANDOM_TARGETS = {
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                 tie_word_embeddings=True, eos_token_ids=(1,)),
    # SmolLM2-135M-Instruct's shape (as converted from the embedded GGUF).
    "smollm2": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                    head_dim=64, rms_norm_eps=9.999999747378752e-06, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                    eos_token_ids=(2,)),
}


def load_target():
  dtype = _dtype(FLAGS.dtype)
  if FLAGS.target.startswith("random:"):
    from ssd_jax.config import ModelConfig
    from ssd_jax.checkpoint import random_model
    name = FLAGS.target.split(":", 1)[1]
    if name not in RANDOM_TARGETS:
      raise app.UsageError(f"unknown random target {name!r}; known: {', '.join(RANDOM_TARGETS)}")
    cfg = ModelConfig(**RANDOM_TARGETS[name])
    return random_model(cfg, dtype=dtype, seed=1234), cfg
  from ssd_jax.checkpoint import load_model
  return load_model(FLAGS.target or None, dtype=dtype, attention_impl="xla")


class _RawTokenizer:
  """The `tokenizers` library's tokenizer.json behind the few calls the corpus code makes
  (a fallback where transformers cannot read the tokenizer config)."""
  is_fast = True

  def __init__(self, model_dir: str):
    from tokenizers import Tokenizer
    self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "config.json")) as f:
      eos = json.load(f).get("eos_token_id")
    self.eos_token_id = eos[0] if isinstance(eos, list) else eos

  def encode(self, text, add_special_tokens=False):
    return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [e.ids for e in self.tok.encode_batch(
        texts, add_special_tokens=add_special_tokens)]}


def load_tok():
  from ssd_jax.checkpoint import load_tokenizer, resolve_model_dir
  path = FLAGS.tokenizer or (FLAGS.target if not FLAGS.target.startswith("random:") else "")
  try:
    return load_tokenizer(path or None)
  except Exception as e:
    model_dir = resolve_model_dir(path or None)
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
      raise
    log(f"transformers could not load the tokenizer ({type(e).__name__}: {e}); "
        "using tokenizer.json directly")
    return _RawTokenizer(model_dir)


def _eos(cfg, tok=None) -> int:
  if cfg.eos_token_ids:
    return int(cfg.eos_token_ids[0])
  if tok is not None and tok.eos_token_id is not None:
    return int(tok.eos_token_id)
  return 0


def make_batches(cfg, split: str, batch: int, seed: int):
  """Batches of the corpus split (a token file, or the installed text streamed)."""
  from ssd_jax.distill import corpus
  path = FLAGS.corpus if split == "train" else FLAGS.heldout_corpus
  if split == "heldout" and not path and FLAGS.corpus != "installed":
    raise app.UsageError("--heldout_corpus is needed with a token-file --corpus")
  if path and path != "installed":
    return corpus.ArrayBatches(corpus.open_token_file(path), batch, FLAGS.seq_len, seed=seed)
  tok = load_tok()
  eos = _eos(cfg, tok)

  def make_iter():
    docs = corpus.iter_documents(split=split, heldout_frac=FLAGS.heldout_frac)
    if split == "train":
      docs = corpus.shuffled(docs, FLAGS.shuffle_buffer, seed)
    return corpus.pack(corpus.iter_token_docs(tok, docs, eos_id=eos), batch, FLAGS.seq_len)
  return corpus.StreamBatches(make_iter)


class MixedBatches:
  """Rows from several sources per batch (e.g. corpus + self-generated), concatenated."""

  def __init__(self, sources):
    self.sources = sources
    self.position = 0

  def start(self, position=0):
    for s in self.sources:
      s.start(position)
    self.position = position
    return self

  def next(self):
    import numpy as np
    self.position += 1
    return np.concatenate([s.next() for s in self.sources], axis=0)


def load_prompt_sets() -> dict:
  if not FLAGS.prompts_file:
    return {}
  from ssd_jax.distill import corpus
  return corpus.load_prompt_sets(FLAGS.prompts_file)


def build_prompt_sets(tok, names, num_self_gen: int = 0) -> dict:
  """Token-id prompts: HumanEval raw / chat-templated, and self-generation prompts."""
  import itertools
  from ssd_jax.distill import corpus
  sets = {}
  chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}],
                                              tokenize=False, add_generation_prompt=True)
  if "humaneval" in names or "humaneval_chat" in names:
    probs = corpus.humaneval_problems()
    if "humaneval" in names:
      sets["humaneval"] = [tok.encode(p["prompt"], add_special_tokens=False) for p in probs]
    if "humaneval_chat" in names:
      sets["humaneval_chat"] = [
          tok.encode(chat("Complete the following Python function:\n```python\n"
                          f"{p['prompt']}```"), add_special_tokens=False) for p in probs]
  if num_self_gen:
    # Half raw code prompts (def + docstring), half chat instructions, from the train split.
    n_code = num_self_gen // 2
    code = itertools.islice(corpus.iter_code_prompts(corpus.shuffled(
        corpus.iter_documents(split="train", heldout_frac=FLAGS.heldout_frac), 256, 1)),
        n_code)
    instr = itertools.islice(corpus.iter_instructions(corpus.shuffled(
        corpus.iter_documents(split="train", heldout_frac=FLAGS.heldout_frac), 256, 2)),
        num_self_gen - n_code)
    ps = [tok.encode(c, add_special_tokens=False) for c in code]
    ps += [tok.encode(chat(i), add_special_tokens=False) for i in instr]
    sets["self_gen"] = [p[:384] for p in ps]
  return sets


def self_generated_pool(target, cfg, prompts, ckpt_dir):
  """Target greedy continuations of `prompts` as one flat token array (cached in ckpt_dir)."""
  import numpy as np
  from ssd_jax.distill import train
  cache = os.path.join(ckpt_dir, "self_gen_tokens.npy") if ckpt_dir else ""
  if cache and os.path.isfile(cache):
    log(f"self-generated data: reusing {cache}")
    return np.load(cache)
  t0 = time.time()
  eos = _eos(cfg)
  conts = train.Generator(target).generate(
      prompts, FLAGS.self_gen_tokens, cfg.eos_token_ids, batch_size=FLAGS.gen_batch,
      time_budget_s=FLAGS.self_gen_seconds or None)
  pairs = [(p, c) for p, c in zip(prompts, conts) if c]
  prompts = [p for p, _ in pairs]
  conts = [c for _, c in pairs]
  flat = []
  for p, c in zip(prompts, conts):
    flat.extend(p)
    flat.extend(c)
    if not c or c[-1] != eos:
      flat.append(eos)
  pool = np.asarray(flat, np.int32)
  log(f"self-generated {sum(map(len, conts)):,} tokens from {len(prompts)} prompts "
      f"in {time.time() - t0:.0f}s ({len(pool):,} tokens with prompts)")
  if cache:
    os.makedirs(ckpt_dir, exist_ok=True)
    np.save(cache, pool)
  return pool


def evaluate(target, cfg, draft, *, heldout=None, prompt_sets=None, dist=None) -> dict:
  """Held-out KL / top-1 and acceptance per prompt set."""
  from ssd_jax.distill import train
  out = {}
  if FLAGS.eval_batches and heldout is not None:
    t0 = time.time()
    heldout.start(0)
    batches = [heldout.next() for _ in range(FLAGS.eval_batches)]
    if dist is None:
      from ssd_jax.distill.train import Distiller, TrainConfig
      dist = Distiller(target, draft, TrainConfig(compute_dtype=str(draft.embed_tokens[...].dtype),
                                                  freeze_embeddings=False))
    out["heldout"] = dist.evaluate(batches)
    out["heldout"]["tokens"] = int(sum(b.size for b in batches))
    log(f"held-out: KL {out['heldout']['kl']:.4f}  top-1 agreement "
        f"{out['heldout']['top1_agreement']:.4f}  ({time.time() - t0:.0f}s)")
  ks = [int(k) for k in FLAGS.eval_ks.split(",") if k]
  for name, prompts in (prompt_sets or {}).items():
    t0 = time.time()
    prompts = prompts[:FLAGS.eval_prompts]
    rep, _ = train.estimate_acceptance(target, draft, prompts, max_new=FLAGS.eval_max_new,
                                       ks=ks, eos_ids=cfg.eos_token_ids,
                                       batch_size=FLAGS.eval_gen_batch)
    rep["seconds"] = round(time.time() - t0, 1)
    out[f"acceptance_{name}"] = rep
    log(f"acceptance on {name} ({rep['prompts']} prompts, {rep['tokens']} target tokens): "
        + "  ".join(f"K={k}: {rep[f'K={k}']['mean_accepted_draft_tokens']:.2f} accepted "
                    f"({rep[f'K={k}']['tokens_per_round']:.2f} tokens/round)" for k in ks)
        + f"  greedy agreement {rep['greedy_token_agreement']:.3f}")
  return out


def mode_train():
  import jax
  import jax.numpy as jnp
  from ssd_jax.distill import corpus, draft_init, train

  t_start = time.time()
  target, cfg = load_target()
  log(f"target: {cfg.model_type} {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
      f"{cfg.vocab_size}, dtype {target.embed_tokens[...].dtype}; backend "
      f"{jax.default_backend()}")
  dcfg = draft_init.draft_config(
      cfg, num_layers=FLAGS.draft_layers, hidden_size=FLAGS.draft_hidden or None,
      intermediate_size=FLAGS.draft_intermediate or None, num_heads=FLAGS.draft_heads or None,
      num_kv_heads=FLAGS.draft_kv_heads or None, model_type=FLAGS.draft_model_type or None)
  draft = draft_init.build_draft(dcfg, target=target, init_from_target=FLAGS.init_from_target,
                                 dtype=jnp.float32, seed=FLAGS.seed)
  if FLAGS.freeze_embeddings and dcfg.hidden_size != cfg.hidden_size:
    raise app.UsageError("--freeze_embeddings needs the target's hidden size")
  n_par = sum(v.size for k, v in draft_init.flat_params(draft).items() if k != "embed_tokens")
  log(f"draft: {dcfg.num_layers} layers, hidden {dcfg.hidden_size}, heads "
      f"{dcfg.num_heads}/{dcfg.num_kv_heads}, {n_par / 1e6:.1f}M non-embedding params, "
      f"init {'from target' if FLAGS.init_from_target else 'random'}")
  cdt = FLAGS.compute_dtype if FLAGS.compute_dtype != "auto" else str(
      target.embed_tokens[...].dtype)
  tc = train.TrainConfig(steps=FLAGS.steps, lr=FLAGS.lr, warmup_steps=FLAGS.warmup,
                         weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip,
                         freeze_embeddings=FLAGS.freeze_embeddings, compute_dtype=cdt,
                         log_every=FLAGS.log_every, ckpt_every=FLAGS.ckpt_every,
                         calib_steps=FLAGS.calib_steps, seed=FLAGS.seed)
  prompt_sets = load_prompt_sets()
  gen_rows = int(round(FLAGS.batch * FLAGS.self_gen_mix)) if FLAGS.self_gen else 0
  batches = make_batches(cfg, "train", FLAGS.batch - gen_rows, FLAGS.seed)
  if gen_rows:
    prompts = prompt_sets.get("self_gen")
    if prompts is None:
      prompts = build_prompt_sets(load_tok(), (), FLAGS.self_gen)["self_gen"]
    pool = self_generated_pool(target, cfg, prompts[:FLAGS.self_gen], FLAGS.ckpt_dir)
    batches = MixedBatches([batches, corpus.ArrayBatches(pool, gen_rows, FLAGS.seq_len,
                                                         seed=FLAGS.seed + 1)])
  dist = train.Distiller(target, draft, tc)
  meta = {"draft_config": dcfg.to_hf_dict()}
  budget = None
  if FLAGS.time_budget_s:
    budget = FLAGS.time_budget_s - (time.time() - t_start)
  t0 = time.time()
  hist = train.train_loop(dist, batches, ckpt_dir=FLAGS.ckpt_dir or None, resume=FLAGS.resume,
                          log=log, time_budget_s=budget, meta=meta,
                          stop_after_s=FLAGS.stop_after_s or None)
  train_s = time.time() - t0
  log(f"trained {len(hist)} steps in {train_s:.0f}s "
      f"({len(hist) * FLAGS.batch * FLAGS.seq_len / max(train_s, 1e-9):,.0f} tok/s incl. "
      f"compile)")
  results = {"train": {"steps_run": len(hist), "final_step": dist.step, "seconds": train_s,
                       "batch": FLAGS.batch, "seq_len": FLAGS.seq_len,
                       "tokens": len(hist) * FLAGS.batch * FLAGS.seq_len,
                       "last_loss": hist[-1]["loss"] if hist else None,
                       "argv": sys.argv[1:]}}
  if FLAGS.layers_dtype == "int8":
    # Training is over (its checkpoint holds the exact weights): from here on, export and
    # evaluation see the draft as it will be stored.
    dist.params = {k: jnp.asarray(v, dist.params[k].dtype)
                   for k, v in draft_init.int8_round_trip(dist.params).items()}
  final = dist.draft_model(dtype=jnp.float32)
  if FLAGS.layers_out:
    draft_init.save_draft_layers(final, dcfg, FLAGS.layers_out, shard_mb=FLAGS.layers_shard_mb,
                                 storage=FLAGS.layers_dtype, extra={"train": results["train"]})
    log(f"wrote draft layers ({FLAGS.layers_dtype}) to {FLAGS.layers_out}")
  if FLAGS.out_dir:
    from ssd_jax.checkpoint.export import save_hf_checkpoint
    tok = None
    try:
      tok = load_tok() if not FLAGS.target.startswith("random:") else None
    except Exception as e:  # exporting without tokenizer files is still useful
      log(f"no tokenizer for export ({e})")
    save_hf_checkpoint(final, dcfg, FLAGS.out_dir, tokenizer=tok)
    log(f"exported HF draft to {FLAGS.out_dir}")
  if FLAGS.eval:
    heldout = None
    if FLAGS.eval_batches and (FLAGS.corpus == "installed" or FLAGS.heldout_corpus):
      heldout = make_batches(cfg, "heldout", FLAGS.batch, 0)
    sets = {n: prompt_sets[n] for n in FLAGS.eval_sets.split(",") if n in prompt_sets}
    missing = [n for n in FLAGS.eval_sets.split(",") if n and n not in prompt_sets]
    if missing and not FLAGS.target.startswith("random:"):
      sets.update(build_prompt_sets(load_tok(), missing))
    eval_draft = dist.draft_model(dtype=target.embed_tokens[...].dtype)
    results.update(evaluate(target, cfg, eval_draft, heldout=heldout, prompt_sets=sets,
                            dist=dist))
  if FLAGS.eval_json:
    train.save_json(FLAGS.eval_json, results)
    log(f"wrote {FLAGS.eval_json}")


def mode_eval():
  from ssd_jax.checkpoint import load_model
  from ssd_jax.checkpoint import default_draft
  from ssd_jax.distill import train
  target, cfg = load_target()
  path = FLAGS.draft or default_draft.ensure_default_draft()
  draft, dcfg = load_model(path, dtype=target.embed_tokens[...].dtype, attention_impl="xla")
  log(f"draft {path}: {dcfg.num_layers} layers")
  prompt_sets = load_prompt_sets()
  names = [n for n in FLAGS.eval_sets.split(",") if n]
  sets = {n: prompt_sets[n] for n in names if n in prompt_sets}
  missing = [n for n in names if n not in sets]
  if missing:
    sets.update(build_prompt_sets(load_tok(), missing))
  heldout = None
  if FLAGS.eval_batches and (FLAGS.corpus == "installed" or FLAGS.heldout_corpus):
    heldout = make_batches(cfg, "heldout", FLAGS.batch, 0)
  results = {"draft": path}
  results.update(evaluate(target, cfg, draft, heldout=heldout, prompt_sets=sets))
  if FLAGS.eval_json:
    train.save_json(FLAGS.eval_json, results)
    log(f"wrote {FLAGS.eval_json}")


def mode_tokenize():
  from ssd_jax.distill import corpus
  if not FLAGS.tokens_out:
    raise app.UsageError("--tokens_out is required")
  tok = load_tok()
  eos = tok.eos_token_id if tok.eos_token_id is not None else 0
  docs = corpus.iter_documents(split=FLAGS.split, heldout_frac=FLAGS.heldout_frac)
  if FLAGS.split == "train":
    docs = corpus.shuffled(docs, FLAGS.shuffle_buffer, FLAGS.seed)
  t0 = time.time()
  n = corpus.write_token_file(FLAGS.tokens_out, corpus.iter_token_docs(tok, docs, eos_id=eos),
                              FLAGS.max_tokens, log=log,
                              time_budget_s=FLAGS.tokenize_seconds or None)
  log(f"wrote {n:,} {FLAGS.split} tokens to {FLAGS.tokens_out} in {time.time() - t0:.0f}s")


def mode_prompts():
  if not FLAGS.prompts_out:
    raise app.UsageError("--prompts_out is required")
  names = [n for n in FLAGS.eval_sets.split(",") if n]
  from ssd_jax.distill import corpus
  sets = build_prompt_sets(load_tok(), names, FLAGS.num_self_gen_prompts)
  corpus.save_prompt_sets(FLAGS.prompts_out, sets)
  log("wrote " + ", ".join(f"{k}: {len(v)} prompts" for k, v in sets.items())
      + f" to {FLAGS.prompts_out}")


def main(argv):
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  {"train": mode_train, "eval": mode_eval, "tokenize": mode_tokenize,
   "prompts": mode_prompts}[FLAGS.mode]()


if __name__ == "__main__":
  app.run(main)
