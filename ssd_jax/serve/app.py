"""The OpenAI-compatible HTTP API (FastAPI) over the engine thread (serve/engine.py).

POST /v1/completions and /v1/chat/completions, streamed (SSE `data: {...}` chunks, then
`data: [DONE]`) or not; GET /v1/models, /health, /metrics (Prometheus text). Every bad
request is a 4xx with OpenAI's error body and one clear message; nothing a client sends
stops the server. A client that disconnects mid-stream has its request cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ssd_jax.engine.sampling import SamplingParams
from ssd_jax.serve.engine import Engine
from ssd_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


_UNION_TAGS = ("str", "int", "float", "bool")
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
             "list_type": "a list", "bool_type": "true or false", "dict_type": "an object"}


def _param(err) -> str | None:
  # pydantic names union members in the location ("str", "list[int]"): keep the fields.
  loc = [str(x) for x in err.get("loc", ()) if x != "body"]
  return ".".join(x for x in loc if "[" not in x and x not in _UNION_TAGS) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
  """pydantic's first complaint as one line naming the field (OpenAI's `param`)."""
  errors = exc.errors()
  err = errors[0]
  if err.get("type") == "json_invalid":
    return "the request body is not valid JSON", None
  param = _param(err)
  if param is None:
    if err.get("type") == "missing":
      return "the request body is missing; send a JSON object", None
    return "the request body must be a JSON object", None
  same = [e for e in errors if _param(e) == param]
  if len(same) > 1:  # a union field (e.g. temperature: int or float): one line for all
    want = sorted({_EXPECTED[e["type"]] for e in same if e.get("type") in _EXPECTED})
    if "a number" in want and "an integer" in want:
      want.remove("an integer")
    got = json.dumps(err.get("input"), default=str)[:40]
    if want:
      return f"'{param}' must be {' or '.join(want)}, got {got}", param
  msg = err.get("msg", "is invalid")
  return f"'{param}': {msg[0].lower() + msg[1:]}", param


def _json_by_default(app):
  """ASGI wrapper: a POST without a JSON Content-Type (curl -d sends a form's) is read as
  JSON anyway, as the OpenAI API does, instead of failing with a confusing message."""
  async def wrapped(scope, receive, send):
    if scope["type"] == "http" and scope["method"] == "POST":
      headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
      scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
    await app(scope, receive, send)
  return wrapped


def build_app(engine: Engine, model_name: str):
  """The ASGI app (FastAPI, wrapped to read every POST body as JSON)."""
  llm = engine.llm

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    # Shutdown (SIGTERM/Ctrl-C through uvicorn): running requests finish first.
    await asyncio.get_running_loop().run_in_executor(None, engine.close)

  app = FastAPI(title="ssd_jax", docs_url=None, redoc_url=None, lifespan=lifespan)

  @app.exception_handler(APIError)
  async def _api_error(_, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, exc: RequestValidationError):
    msg, param = _validation_message(exc)
    return JSONResponse(APIError(400, msg, param).body(), status_code=400)

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": 0, "owned_by": "ssd_jax",
                                        "max_model_len": llm.max_model_len}]}

  @app.get("/metrics")
  async def metrics():
    return Response(engine.metrics.render(engine), media_type=engine.metrics.content_type)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, http: HTTPRequest):
    if body.echo:
      raise APIError(400, "echo is not supported", "echo")
    if body.logprobs is not None:
      raise APIError(400, "logprobs are not supported", "logprobs")
    ids = _completion_prompt(llm, body.prompt)
    return await _respond(engine, model_name, body, ids, body.max_tokens, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    if body.logprobs:
      raise APIError(400, "logprobs are not supported", "logprobs")
    ids = _chat_prompt(llm, body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    return await _respond(engine, model_name, body, ids, max_tokens, chat=True)

  return _json_by_default(app)


# -- prompts ------------------------------------------------------------------------------
def _completion_prompt(llm, prompt) -> list[int]:
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
    if len(prompt) != 1:
      raise APIError(400, f"'prompt' holds {len(prompt)} prompts; send one prompt per "
                     "request", "prompt")
    prompt = prompt[0]
  if isinstance(prompt, str) and llm.tokenizer is None:
    raise APIError(400, "this model has no tokenizer; send 'prompt' as a list of token ids",
                   "prompt")
  try:
    return llm.encode(prompt)
  except ValueError as e:
    raise APIError(400, f"'prompt': {e}", "prompt") from None


def _chat_prompt(llm, messages) -> list[int]:
  tok = llm.tokenizer
  if not messages:
    raise APIError(400, "'messages' is empty; send at least one message", "messages")
  if tok is None or not getattr(tok, "chat_template", None):
    raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                   "messages")
  conv = [{"role": m.role, "content": m.text()} for m in messages]
  try:
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
  except Exception as e:  # noqa: BLE001 - a template may raise anything (e.g. role order)
    raise APIError(400, f"'messages': the chat template refused them: {e}",
                   "messages") from None
  if isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return list(ids)


def _params(llm, body, prompt_len: int, max_tokens) -> SamplingParams:
  limit = llm.max_model_len
  if body.n != 1:
    raise APIError(400, f"'n' must be 1 (one choice per request), got {body.n}", "n")
  if prompt_len < 1:
    raise APIError(400, "the prompt is empty: it must contain at least one token", "prompt")
  if prompt_len >= limit:
    raise APIError(400, f"the prompt is {prompt_len} tokens; this model's max_model_len is "
                   f"{limit} (prompt + max_tokens)", "prompt", "context_length_exceeded")
  if max_tokens is None:
    max_tokens = limit - prompt_len  # OpenAI's default: up to the context length
  elif max_tokens < 1:
    raise APIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
  elif prompt_len + max_tokens > limit:
    raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                   f"max_model_len={limit}; lower max_tokens", "max_tokens",
                   "context_length_exceeded")
  stop = body.stop if body.stop is not None else ()
  top_k = body.top_k if body.top_k is not None else 0
  try:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k == -1 else top_k, max_new_tokens=max_tokens,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.seed, ignore_eos=body.ignore_eos)
  except (TypeError, ValueError) as e:
    param = str(e).split(" ", 1)[0]
    raise APIError(400, str(e), param if param.isidentifier() else None) from None


# -- answers ------------------------------------------------------------------------------
def _usage(prompt_len: int, out) -> dict:
  n = len(out.token_ids)
  return {"prompt_tokens": prompt_len, "completion_tokens": n,
          "total_tokens": prompt_len + n}


async def _respond(engine: Engine, model_name: str, body, ids, max_tokens, chat: bool):
  if body.model != model_name:
    raise APIError(404, f"model '{body.model}' does not exist; this server serves "
                   f"'{model_name}' (GET /v1/models)", "model", "model_not_found")
  params = _params(engine.llm, body, len(ids), max_tokens)
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()
  req = engine.submit(ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait,
                                                                        ev))
  meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
          "created": int(time.time()), "model": model_name}
  if body.stream:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(req, events, meta, chat, len(ids), include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
  try:
    text = []
    while True:
      kind, value = await events.get()
      if kind == "text":
        text.append(value)
      elif kind == "error":
        raise APIError(500, value, type="server_error")
      else:
        out = value
        break
  finally:
    if req.output is None:  # the handler was cancelled (client gone)
      req.cancel()
  choice = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
  if chat:
    choice["message"] = {"role": "assistant", "content": out.text}
  else:
    choice["text"] = out.text
  return {**meta, "object": "chat.completion" if chat else "text_completion",
          "choices": [choice], "usage": _usage(len(ids), out)}


def _sse(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(req, events: asyncio.Queue, meta: dict, chat: bool, prompt_len: int,
                  include_usage: bool):
  obj = "chat.completion.chunk" if chat else "text_completion"

  def chunk(text: str | None, finish=None, role: bool = False) -> str:
    c = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
      delta = {}
      if role:
        delta["role"] = "assistant"
      if text is not None:
        delta["content"] = text
      c["delta"] = delta
    else:
      c["text"] = text or ""
    out = {**meta, "object": obj, "choices": [c]}
    if include_usage:
      out["usage"] = None
    return _sse(out)

  done = False
  try:
    if chat:
      yield chunk("", role=True)
    while True:
      kind, value = await events.get()
      if kind == "text":
        yield chunk(value)
      elif kind == "error":
        yield _sse(APIError(500, value, type="server_error").body())
        break
      else:
        yield chunk(None if chat else "", finish=value.finish_reason)
        if include_usage:
          yield _sse({**meta, "object": obj, "choices": [],
                      "usage": _usage(prompt_len, value)})
        break
    done = True
    yield "data: [DONE]\n\n"
  finally:
    if not done:  # the client went away mid-stream (Starlette cancelled us)
      with contextlib.suppress(Exception):
        req.cancel()
