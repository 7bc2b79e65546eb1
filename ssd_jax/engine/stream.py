"""New text of a streaming request, as its tokens arrive.

Text is not a concatenation of per-token pieces: a BPE/byte-level tokenizer may need
several tokens for one UTF-8 character (decoding a prefix ends in U+FFFD), and a
SentencePiece one decides a piece's leading space from its neighbours. So every update
decodes the whole output so far and sends only what is new after what was already sent.

What is sent never goes past a stop string or EOS, because the final text cuts there
(llm.LLM._output): until the request finishes, a suffix that could be the start of a stop
string, and a trailing replacement character (an incomplete UTF-8 sequence), are held
back. At finish the rest of the final text is sent.
"""

from __future__ import annotations

from typing import Callable, Sequence as Seq

REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: Seq[str]) -> str:
  """The text before the first stop string, as the engine's final output cuts it (each
  stop in turn, so the result is the same as LLM._output's)."""
  for stop in stops:
    if stop in text:
      text = text[:text.index(stop)]
  return text


def _partial_stop_len(text: str, stops: Seq[str]) -> int:
  """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
  best = 0
  for stop in stops:
    for n in range(min(len(stop) - 1, len(text)), best, -1):
      if text.endswith(stop[:n]):
        best = n
        break
  return best


class TextStream:
  """Turns a request's growing token list into text deltas.

  decode: token ids -> text (the engine's own decode, so the stream and the final
  RequestOutput.text agree). `update(ids, finished)` returns the text to send now.
  """

  def __init__(self, decode: Callable[[list[int]], str], stops: Seq[str] = ()):
    self.decode = decode
    self.stops = tuple(stops)
    self.sent = ""  # text already handed out

  def update(self, token_ids: list[int], finished: bool) -> str:
    text = cut_at_stop(self.decode(list(token_ids)), self.stops)
    if not finished:
      text = text.rstrip(REPLACEMENT)  # an incomplete UTF-8 sequence: wait for more bytes
      text = text[:len(text) - _partial_stop_len(text, self.stops)]
    if not text.startswith(self.sent):
      # Decoding more tokens changed text already sent (a tokenizer's clean-up of spaces):
      # it cannot be taken back, so send nothing until the text catches up again.
      return ""
    delta = text[len(self.sent):]
    self.sent = text
    return delta
