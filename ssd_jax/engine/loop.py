"""What every decoding method shares: the wave of sequences, the device-resident decode
state, stop rules applied on device, and the host loop that reads results with a lag.

A decoding method (AR, SD, SSD) implements two things: `start(wave)`, which prefills and
returns the wave's state (a pytree: the device-resident decode state holding each
sequence's first generated token, and whatever else the method's rounds need), and
`round(state, obs)`, which dispatches one step/round and returns the new state plus the
tokens it emitted. The host loop here never waits on the round it just dispatched: it
reads the tokens of a round `lag` rounds back, so the devices always have queued work.
The copies of those tokens to the host are started as soon as a round is dispatched
(`copy_to_host_async`), so the lagged read finds them already there instead of running a
device-to-host transfer (and its synchronisation) between two dispatches. Timing is the
optional observer's (engine/observe.py), not the methods'.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.sampling import SamplingArrays, sample_tokens
from ssd_jax.engine.sequence import Sequence, Status


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Per-sequence progress, on device. `token` is the newest token: it is part of the
  output but its KV is not yet written; it sits at position `pos`."""
  token: jax.Array       # int32 [B]
  pos: jax.Array         # int32 [B]
  done: jax.Array        # bool [B]
  generated: jax.Array   # int32 [B] tokens emitted so far
  key: jax.Array         # PRNG key for this mesh's sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WaveConstants:
  """Per-wave arrays that do not change from step to step."""
  page_table: jax.Array   # int32 [B, P]
  max_new: jax.Array      # int32 [B]
  eos_ids: jax.Array      # int32 [E] (-1 padded)
  ignore_eos: jax.Array   # bool [B]
  sampling: SamplingArrays


@dataclasses.dataclass
class Wave:
  """Sequences decoded together, padded to a batch bucket, with their pages."""
  seqs: list[Sequence]
  batch: int
  page_table: np.ndarray  # int32 [batch, P]

  @property
  def all_greedy(self) -> bool:
    return all(s.params.greedy for s in self.seqs)

  def constants(self, eos_ids: tuple[int, ...]) -> WaveConstants:
    pad = self.batch - len(self.seqs)
    eos = np.full((max(len(eos_ids), 1),), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    return WaveConstants(
        page_table=self.page_table,
        max_new=np.asarray([s.params.max_new_tokens for s in self.seqs] + [1] * pad, np.int32),
        eos_ids=eos,
        ignore_eos=np.asarray([s.params.ignore_eos for s in self.seqs] + [True] * pad),
        sampling=SamplingArrays.from_params([s.params for s in self.seqs], self.batch))


def apply_stops(emitted, count, state_done, generated, consts: WaveConstants):
  """Cut each sequence's emitted tokens at EOS and at max_new_tokens (on device).

  emitted: int32 [B, N] with count [B] valid. Returns (count, done, generated).
  """
  n = emitted.shape[1]
  idx = jnp.arange(n)[None, :]
  valid = idx < count[:, None]
  is_eos = jnp.any(emitted[..., None] == consts.eos_ids[None, None, :], axis=-1)
  is_eos = is_eos & valid & ~consts.ignore_eos[:, None]
  hit_eos = jnp.any(is_eos, axis=1)
  count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count)
  count = jnp.minimum(count, consts.max_new - generated)
  count = jnp.where(state_done, 0, count).astype(jnp.int32)
  generated = generated + count
  done = state_done | hit_eos | (generated >= consts.max_new)
  return count, done, generated


def next_tokens(logits, consts: WaveConstants, key, greedy: bool):
  """Sample from the target distribution; an all-greedy wave skips the sort (argmax)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_tokens(logits, consts.sampling, key)


def first_token_state(logits, consts: WaveConstants, prompt_len, key, greedy: bool = False):
  """Sample each sequence's first token from its prefill logits; build the decode state."""
  key, sub = jax.random.split(key)
  token = next_tokens(logits, consts, sub, greedy)
  done0 = jnp.zeros(token.shape, bool)
  count, done, generated = apply_stops(token[:, None], jnp.ones_like(token), done0,
                                       jnp.zeros_like(token), consts)
  state = DecodeState(token=token, pos=prompt_len, done=done, generated=generated, key=key)
  return state, token[:, None], count


@dataclasses.dataclass
class WaveStats:
  rounds: int = 0
  decode_s: float = 0.0
  prefill_s: float = 0.0


class DecodingMethod:
  """Base class of AR, SD and SSD: subclasses implement start() and round()."""

  lag = 2  # rounds the host reads behind the newest dispatched round

  def __init__(self, tokenizer_decode, eos_ids: tuple[int, ...]):
    self.decode_text = tokenizer_decode
    self.eos_ids = tuple(eos_ids)

  def start(self, wave: Wave):
    """Prefill a wave; return (wave state, first tokens [B, 1], count [B]). The wave state
    is a pytree holding everything the method's rounds need for this wave."""
    raise NotImplementedError

  def round(self, state, obs: RoundObserver):
    """Dispatch one round; return (state, emitted [B, N], count [B], info dict of device
    arrays for metrics, e.g. accepted/hit)."""
    raise NotImplementedError

  def num_compilations(self) -> int:
    raise NotImplementedError

  def finish(self) -> None:
    """Called when a wave's last round has been read: wait for host work of the method
    still under way (SSD's draft thread)."""

  def in_flight(self):
    """Device arrays of work a round dispatched that its outputs do not cover (SSD's
    cache for the next lookup); profile mode waits for them too."""
    return ()

  # -- the host loop ---------------------------------------------------------------------
  def run_wave(self, wave: Wave, progress=None, obs: RoundObserver | None = None) -> WaveStats:
    obs = obs or RoundObserver()
    stats = WaveStats()
    t0 = time.perf_counter()
    state, first, first_count = self.start(wave)
    first = np.asarray(first)  # one sync per wave: TTFT needs the first token anyway
    t_first = time.perf_counter()
    stats.prefill_s = t_first - t0
    first_count = np.asarray(first_count)
    for i, seq in enumerate(wave.seqs):
      seq.t_first_token = t_first
      self._emit(seq, first[i, :first_count[i]])
    pending: collections.deque = collections.deque()
    t_dec = time.perf_counter()
    while True:
      for s in wave.seqs:  # a client went away: stop waiting for its sequence
        if s.abort_requested and not s.is_finished:
          self._finish(s, "abort")
      if all(s.is_finished for s in wave.seqs):
        break
      t_round = time.perf_counter()
      with obs.host("round"):
        state, emitted, count, info = self.round(state, obs)
      stats.rounds += 1
      if obs.profile:
        jax.block_until_ready((state, emitted, count, info, self.in_flight()))
        obs.round_done(time.perf_counter() - t_round, info)
      # Start the device-to-host copies now; the lagged read below then finds the data
      # on the host instead of waiting for a transfer between two dispatches.
      for x in (emitted, count, *info.values()):
        x.copy_to_host_async()
      pending.append((emitted, count, info))
      if len(pending) > self.lag:
        with obs.host("drain"):
          self._drain(wave, pending.popleft(), progress, obs)
    while pending:
      self._drain(wave, pending.popleft(), progress, obs)
    self.finish()
    for seq in wave.seqs:  # a sequence the device stopped without a host-side reason
      if not seq.is_finished:
        self._finish(seq, "length")
    stats.decode_s = time.perf_counter() - t_dec
    return stats

  def _drain(self, wave: Wave, item, progress, obs: RoundObserver) -> None:
    emitted, count, info = item
    emitted, count = np.asarray(emitted), np.asarray(count)
    info = {k: np.asarray(v) for k, v in info.items()}
    obs.round_read([s if not s.is_finished else None for s in wave.seqs], count, info)
    for i, seq in enumerate(wave.seqs):
      if seq.is_finished:
        continue
      if count[i] == 0:  # the device stopped it in an earlier round: nothing more comes
        self._finish(seq, "length")
        continue
      seq.num_rounds += 1
      if "accepted" in info:
        seq.num_accepted += int(info["accepted"][i])
      if "hit" in info and info.get("looked_up", np.ones_like(info["hit"]))[i]:
        seq.num_lookups += 1
        seq.num_hits += int(info["hit"][i])
      self._emit(seq, emitted[i, :count[i]])
    if progress is not None:
      progress(sum(len(s.output_token_ids) for s in wave.seqs))

  def _emit(self, seq: Sequence, tokens) -> None:
    if seq.is_finished:
      return
    p = seq.params
    for tok in tokens:
      tok = int(tok)
      seq.output_token_ids.append(tok)
      if not p.ignore_eos and tok in self.eos_ids:
        self._finish(seq, "stop")
        return
      if p.stop and self._hit_stop_string(seq):
        self._finish(seq, "stop")
        return
      if len(seq.output_token_ids) >= p.max_new_tokens:
        self._finish(seq, "length")
        return
    if seq.on_tokens is not None:  # (a finish above has notified already)
      seq.on_tokens(seq)

  def _hit_stop_string(self, seq: Sequence) -> bool:
    tail = self.decode_text(seq.output_token_ids[-32:])
    return any(s in tail for s in seq.params.stop)

  def _finish(self, seq: Sequence, reason: str) -> None:
    seq.status = Status.FINISHED
    seq.finish_reason = reason
    seq.t_finish = time.perf_counter()
    if seq.on_tokens is not None:
      seq.on_tokens(seq)
