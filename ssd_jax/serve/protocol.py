"""The OpenAI request schema this server accepts (pydantic), and its error body.

Types are strict: "5" for max_tokens is a 400, not silently 5. Fields OpenAI defines that
this server does not use (user, presence_penalty, ...) are accepted and ignored, since
clients send them; ones whose meaning would be lost (n > 1, logprobs) are refused in
serve/app.py with a clear message.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class _Base(BaseModel):
  model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
  include_usage: StrictBool = False


class _Sampling(_Base):
  model: StrictStr
  max_tokens: StrictInt | None = None
  temperature: Number | None = None   # None: OpenAI's default, 1
  top_p: Number | None = None
  top_k: StrictInt | None = None      # extension (vLLM's too); 0 or -1: off
  seed: StrictInt | None = None
  stop: StrictStr | list[StrictStr] | None = None
  n: StrictInt = 1
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  ignore_eos: StrictBool = False      # extension, for benchmarks


class CompletionRequest(_Sampling):
  prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
  echo: StrictBool = False
  logprobs: StrictInt | None = None


class TextPart(_Base):
  type: Literal["text"]
  text: StrictStr


class ChatMessage(_Base):
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: StrictStr | list[TextPart] | None = None

  def text(self) -> str:
    if self.content is None:
      return ""
    if isinstance(self.content, str):
      return self.content
    return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage]
  max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens
  logprobs: StrictBool | None = None


class APIError(Exception):
  """An error answered as OpenAI's JSON body with this HTTP status."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                   code, type)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}
