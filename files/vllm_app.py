"""An OpenAI-compatible Ray Serve app over vLLM's async engine.

The chart ships this file in a ConfigMap; the RayService runs it as `vllm_app:build_app` with the
`args` rendered from values (README, "The app contract"). Read top to bottom:

  1. the args contract (AppArgs)       5. request preparation (prompt, limits, sampling)
  2. the OpenAI protocol               6. response and stream building
  3. errors                            7. the deployment: thin routes
  4. the engine adapter                8. build_app

vLLM is imported only inside the engine adapter, so building the app (on the Serve controller) and
the unit tests do not need it. Only public vLLM and Ray APIs are used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

# The serveConfigV2 env var holding the sha256 of this file, set by the chart (see VLLMServer.__init__).
CODE_HASH_ENV = "VLLM_APP_SHA256"


# ---------------------------------------------------------------------------------------------
# 1. The args contract: what serveConfigV2 `args` may hold. Keys are the chart's values names.
# ---------------------------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ModelArgs(_Args):
    id: str = Field(min_length=1)
    served_name: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None

    # The chart renders unset strings as "": they mean "not set".
    @field_validator("served_name", "revision", "chat_template", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return value or None

    @property
    def name(self) -> str:
        return self.served_name or self.id


class EngineArgs(_Args):
    dtype: Literal["auto", "float16", "bfloat16", "float32", "half", "float"] = "auto"
    max_model_len: Optional[int] = Field(default=None, ge=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    # Passed to vLLM's AsyncEngineArgs unchanged, by their Python names.
    extra_args: dict[str, Any] = Field(default_factory=dict)


class ServingArgs(_Args):
    # Name of the environment variable holding the API key; empty: no auth.
    api_key_env: Optional[str] = None
    log_prompts: bool = False

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return value or None


class AppArgs(_Args):
    model: ModelArgs
    engine: EngineArgs = Field(default_factory=EngineArgs)
    serving: ServingArgs = Field(default_factory=ServingArgs)


# ---------------------------------------------------------------------------------------------
# 2. The OpenAI protocol. Requests accept (and ignore) fields this server does not use, the way
#    OpenAI clients expect; the fields it uses are type-checked strictly.
# ---------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logprobs: Optional[Union[bool, int]] = None
    # vLLM extensions that OpenAI clients send through `extra_body`.
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_tokens: Optional[int] = Field(default=None, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty strings")
        return value

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        # The newer name wins, as in OpenAI's API.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        if value == [] or value == "":
            raise ValueError("prompt must not be empty")
        return value


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------------------------
# 3. Errors. Everything a client did wrong becomes an OpenAIError with its HTTP status, decided
#    before the first byte of a response is sent; the body is OpenAI's nested error object.
# ---------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_validation_error(error: ValidationError) -> OpenAIError:
    errors = error.errors()
    if errors[0]["type"] == "json_invalid":
        return OpenAIError(400, f"The request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    # A union reports one error per alternative; the deepest one is the most specific.
    worst = max(errors, key=lambda e: len(e["loc"]))
    param = ".".join(str(part) for part in worst["loc"] if not _is_union_tag(part)) or None
    message = f"Invalid value for '{param}': {worst['msg']}" if param else worst["msg"]
    return OpenAIError(400, message, param=param, code="invalid_value")


def _is_union_tag(part) -> bool:
    """Pydantic names union alternatives in error locations ('str', 'list[TextPart]'): not fields."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def _from_engine_error(error: Exception) -> OpenAIError:
    """The one place that maps engine failures to statuses."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, (ValueError, TypeError)):
        # vLLM rejects some inputs only when it processes them (for example a bad stop token).
        return OpenAIError(400, str(error))
    if type(error).__name__ in ("EngineDeadError", "EngineGenerateError"):
        return OpenAIError(503, "The model engine is not healthy; retry shortly.",
                           type="service_unavailable", code="engine_unhealthy")
    logger.exception("unexpected engine error")
    return OpenAIError(500, "Internal error while generating.", type="server_error")


# ---------------------------------------------------------------------------------------------
# 4. The engine adapter: the only code that touches vLLM. The routes use only its narrow interface
#    (start, render_chat, encode, sampling_params, generate, abort, check_health).
# ---------------------------------------------------------------------------------------------


class VLLMEngine:
    def __init__(self, args: AppArgs):
        self.args = args
        self.engine = None
        self.tokenizer = None

    async def start(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_engine_kwargs(self.args)))
        self.tokenizer = await _maybe_await(self.engine.get_tokenizer())
        # What vLLM settled on (the model's own limit when engine.maxModelLen is unset).
        self.max_model_len = self.engine.model_config.max_model_len

    def chat_template_available(self) -> bool:
        return bool(self.args.model.chat_template or getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True,
            chat_template=self.args.model.chat_template,
        )
        # The template already holds the special tokens the model expects.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def sampling_params(self, **kwargs):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if kwargs.pop("stream") else RequestOutputKind.FINAL_ONLY
        return SamplingParams(output_kind=kind, **kwargs)

    def generate(self, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
        return self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        await self.engine.check_health()

    def unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def vllm_engine_kwargs(args: AppArgs) -> dict:
    """AsyncEngineArgs keywords from the args contract."""
    engine = args.engine
    kwargs = {
        "model": args.model.id,
        "served_model_name": [args.model.name],
        "revision": args.model.revision,
        "trust_remote_code": args.model.trust_remote_code,
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enforce_eager": engine.enforce_eager,
    }
    if engine.tensor_parallel_size * engine.pipeline_parallel_size > 1:
        # The replica actor holds all of its GPUs on one pod (the chart enforces it), so vLLM's
        # own worker processes share them; no Ray placement group is needed.
        kwargs["distributed_executor_backend"] = "mp"
    kwargs.update(engine.extra_args)
    return kwargs


async def _maybe_await(value):
    return await value if asyncio.iscoroutine(value) else value


# ---------------------------------------------------------------------------------------------
# 5. Request preparation: parse, render the prompt, fit it in the context, build sampling params.
# ---------------------------------------------------------------------------------------------


async def _parse(request: Request, model_class):
    raw = await request.body()
    try:
        return model_class.model_validate_json(raw or b"")
    except ValidationError as error:
        raise _from_validation_error(error) from None


def _check_unsupported(body: _SamplingRequest) -> None:
    if body.logprobs not in (None, False, 0):
        raise OpenAIError(400, "logprobs are not supported by this server.", param="logprobs",
                          code="unsupported_parameter")
    if isinstance(body, CompletionRequest) and (body.echo or body.suffix):
        param = "echo" if body.echo else "suffix"
        raise OpenAIError(400, f"'{param}' is not supported by this server.", param=param,
                          code="unsupported_parameter")


def _fit_max_tokens(prompt_tokens: int, requested: Optional[int], max_model_len: int, param: str,
                    prompt_param: str) -> int:
    """How many tokens a completion may have: what was asked for, or whatever the context has left."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise OpenAIError(
            400,
            f"The prompt has {prompt_tokens} tokens, but the model's context is {max_model_len} tokens. "
            "Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room
    if requested > room:
        raise OpenAIError(
            400,
            f"{param} is {requested}, but the prompt leaves room for {room} tokens "
            f"({prompt_tokens} prompt tokens in a {max_model_len}-token context). Lower {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _sampling_kwargs(body: _SamplingRequest, max_tokens: int) -> dict:
    kwargs = {
        "stream": body.stream,
        "n": body.n,
        "max_tokens": max_tokens,
        "stop": body.stop,
        "seed": body.seed,
        "ignore_eos": body.ignore_eos,
    }
    optional = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "top_k": body.top_k,
        "min_tokens": body.min_tokens,
    }
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    return kwargs


# ---------------------------------------------------------------------------------------------
# 6. Responses and streams. A stream is an SSE body: `data: {json}` frames, the first carrying the
#    role (chat), then deltas, an optional usage frame, then `data: [DONE]`.
# ---------------------------------------------------------------------------------------------


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Completion:
    """One request's shape: chat or text completion. Knows how to turn engine outputs into frames."""

    def __init__(self, kind: Literal["chat", "text"], model: str, n: int, prompt_tokens: int):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reasons: dict[int, str] = {}

    def _envelope(self, object_name: str, choices: list, usage: Optional[dict] = None) -> dict:
        payload = {"id": self.id, "object": object_name, "created": self.created,
                   "model": self.model, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return payload

    def response(self, outputs) -> dict:
        """The whole non-streaming response from the engine's final outputs."""
        choices = []
        for out in sorted(outputs, key=lambda out: out.index):
            self.completion_tokens += len(out.token_ids)
            self.finish_reasons[out.index] = out.finish_reason
            if self.kind == "chat":
                choices.append({"index": out.index, "finish_reason": out.finish_reason, "logprobs": None,
                                "message": {"role": "assistant", "content": out.text}})
            else:
                choices.append({"index": out.index, "finish_reason": out.finish_reason, "logprobs": None,
                                "text": out.text})
        return self._envelope(self.object, choices, _usage(self.prompt_tokens, self.completion_tokens))

    def role_frames(self) -> list[bytes]:
        if self.kind != "chat":
            return []
        return [_sse(self._envelope("chat.completion.chunk", [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]))
            for index in range(self.n)]

    def delta_frames(self, outputs) -> list[bytes]:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        frames = []
        for out in outputs:
            self.completion_tokens += len(out.token_ids)
            if out.finish_reason is not None:
                self.finish_reasons[out.index] = out.finish_reason
            if not out.text and out.finish_reason is None:
                continue
            if self.kind == "chat":
                choice = {"index": out.index, "delta": {"content": out.text} if out.text else {},
                          "logprobs": None, "finish_reason": out.finish_reason}
            else:
                choice = {"index": out.index, "text": out.text, "logprobs": None,
                          "finish_reason": out.finish_reason}
            frames.append(_sse(self._envelope(object_name, [choice])))
        return frames

    def usage_frame(self) -> bytes:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return _sse(self._envelope(object_name, [], _usage(self.prompt_tokens, self.completion_tokens)))


# ---------------------------------------------------------------------------------------------
# 6b. Request-path helpers. They stand above the deployment on purpose: Ray Serve pickles the
#     deployment class when it is decorated, so anything it calls must already be defined.
# ---------------------------------------------------------------------------------------------


async def _final_output(engine: VLLMEngine, prompt_ids, params, request_id):
    final = None
    try:
        async for output in engine.generate(prompt_ids, params, request_id):
            final = output
    except asyncio.CancelledError:
        # The client went away before the answer was ready.
        await engine.abort(request_id)
        raise
    if final is None:
        raise RuntimeError("the engine finished without output")
    return final


async def _close(generator) -> None:
    aclose = getattr(generator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing a failed generator may re-raise its error; it is reported already
            pass


class _RequestLog:
    """One log line per request: id, route, status, token counts, latency; prompt text only if enabled."""

    def __init__(self, request_id, route, completion, started, prompt_text):
        self.request_id, self.route, self.completion, self.started = request_id, route, completion, started
        self.prompt_text = prompt_text

    def finish(self, status: int) -> None:
        latency_ms = (time.monotonic() - self.started) * 1000
        line = (f"request_id={self.request_id} route={self.route} status={status} "
                f"prompt_tokens={self.completion.prompt_tokens} "
                f"completion_tokens={self.completion.completion_tokens} "
                f"finish={','.join(sorted(set(self.completion.finish_reasons.values()))) or '-'} "
                f"latency_ms={latency_ms:.0f}")
        if self.prompt_text is not None:
            line += f" prompt={json.dumps(self.prompt_text)[:2000]}"
        logger.info(line)


def _api_key(serving: ServingArgs) -> Optional[bytes]:
    if serving.api_key_env is None:
        return None
    key = os.environ.get(serving.api_key_env, "")
    if not key:
        # Refuse to serve openly when the chart asked for auth but the key did not arrive.
        raise RuntimeError(f"serving.apiKeyEnv names {serving.api_key_env}, but that environment "
                           "variable is empty; check the API key Secret.")
    return key.encode()


def _wait_for_current_code(path: Optional[Path] = None, timeout_s: float = 300, poll_s: float = 2) -> bool:
    """Whether this file is the version the Serve config expects; if not yet, wait for it.

    A code change reaches the cluster twice: the hash in serveConfigV2 (Serve restarts the app at
    once) and the ConfigMap volume (the kubelet refreshes it within a minute or two). When the
    restart wins that race, this process runs the old file: wait until the new one is on disk and
    return False, so the caller reloads it. Failing instead would burn Serve's few start retries
    and leave the app DEPLOY_FAILED.
    """
    expected = os.environ.get(CODE_HASH_ENV)
    path = path or Path(__file__)
    if not expected or hashlib.sha256(path.read_bytes()).hexdigest() == expected:
        return True
    logger.warning("%s is not the version the Serve config expects yet; waiting for the ConfigMap update", path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if hashlib.sha256(path.read_bytes()).hexdigest() == expected:
            return False
    raise RuntimeError(f"{path} still does not have sha256 {expected} after {timeout_s:.0f}s: the app "
                       "ConfigMap has not reached this pod. Check that it is mounted without subPath.")


# ---------------------------------------------------------------------------------------------
# 7. The deployment. Routes are thin: authorize, parse, prepare, hand to the engine, answer.
#    Replica counts, autoscaling, queue limits and resources come from serveConfigV2, not code.
# ---------------------------------------------------------------------------------------------

api = FastAPI(title="vllm-rayservice", docs_url=None, redoc_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, error: OpenAIError):
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    # Unknown routes and wrong methods, in OpenAI's error shape too.
    return JSONResponse(OpenAIError(error.status_code, str(error.detail), code="not_found"
                                    if error.status_code == 404 else None).body(),
                        status_code=error.status_code)


@serve.deployment(name="VLLMServer")
@serve.ingress(api)
class VLLMServer:
    async def __init__(self, args: AppArgs):
        if not await asyncio.to_thread(_wait_for_current_code):
            # This process already imported the old file; a fresh replica imports the new one.
            raise RuntimeError("the app code on this pod changed while the replica started; "
                               "Serve restarts it with the new code")
        self.args = args
        self.model_name = args.model.name
        self.created = int(time.time())
        self.api_key = _api_key(args.serving)
        self.stats = {"requests": 0, "aborted": 0, "in_flight": 0}
        # Loading the model inside the constructor keeps the replica out of rotation until it is ready.
        self.engine = VLLMEngine(args)
        await self.engine.start()

    # -- Ray Serve hooks ----------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        await self.engine.check_health()

    def get_stats(self) -> dict:
        """Request counters and the engine's unfinished requests, for operators and tests (through
        a Serve handle, not HTTP)."""
        return {**self.stats, "engine_unfinished": self.engine.unfinished_requests()}

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    # -- Routes -----------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> Response:
        try:
            await self.engine.check_health()
        except Exception as error:  # any failure means: do not send traffic here
            return JSONResponse({"status": "unhealthy", "detail": str(error)[:200]}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "vllm-rayservice", "root": self.args.model.id}
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        started = time.monotonic()
        body = await self._admit(request, ChatCompletionRequest)
        engine = self.engine
        if not engine.chat_template_available():
            raise OpenAIError(400, f"Model '{self.model_name}' has no chat template, so chat messages "
                              "cannot be turned into a prompt. Use /v1/completions, or set the chart "
                              "value model.chatTemplate.", param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            prompt_ids = engine.render_chat(messages)
        except Exception as error:  # a template that rejects these messages (roles, order)
            raise OpenAIError(400, f"The chat template rejected these messages: {error}",
                              param="messages", code="invalid_messages") from None
        max_tokens = _fit_max_tokens(len(prompt_ids), body.requested_max_tokens(), engine.max_model_len,
                                     "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                                     prompt_param="messages")
        completion = Completion("chat", self.model_name, body.n, len(prompt_ids))
        return await self._complete(request, engine, body, completion, [prompt_ids], max_tokens, started,
                                    prompt_text=messages)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        started = time.monotonic()
        body = await self._admit(request, CompletionRequest)
        engine = self.engine
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) > 1 and body.stream:
            raise OpenAIError(400, "Streaming takes one prompt; send a list of prompts without stream.",
                              param="prompt", code="unsupported_parameter")
        prompt_ids = [engine.encode(prompt) for prompt in prompts]
        max_tokens = min(_fit_max_tokens(len(ids), body.requested_max_tokens(), engine.max_model_len,
                                         "max_tokens", prompt_param="prompt") for ids in prompt_ids)
        completion = Completion("text", self.model_name, body.n * len(prompts), sum(map(len, prompt_ids)))
        return await self._complete(request, engine, body, completion, prompt_ids, max_tokens, started,
                                    prompt_text=prompts)

    # -- The shared request path ------------------------------------------------------------

    async def _complete(self, request, engine, body, completion, prompt_ids_list, max_tokens, started,
                        prompt_text) -> Response:
        params = engine.sampling_params(**_sampling_kwargs(body, max_tokens))
        # Ray Serve's proxy puts X-Request-Id on every request (the client's, or one it makes) and
        # echoes it in the response; the log line carries the same id.
        request_id = request.headers.get("x-request-id") or completion.id
        self.stats["requests"] += 1
        log = _RequestLog(request_id, request.url.path, completion, started,
                          prompt_text if self.args.serving.log_prompts else None)
        if body.stream:
            return await self._stream(engine, body, completion, prompt_ids_list[0], params, log)

        outputs = []
        self.stats["in_flight"] += 1
        try:
            # A list of prompts becomes one engine request each, generated concurrently.
            for index, result in enumerate(await asyncio.gather(*[
                    _final_output(engine, ids, params, f"{completion.id}-{i}")
                    for i, ids in enumerate(prompt_ids_list)])):
                for out in result.outputs:
                    out.index = index * body.n + out.index
                    outputs.append(out)
        except asyncio.CancelledError:
            # The client went away; _final_output has aborted the engine requests.
            self.stats["aborted"] += 1
            log.finish(499)
            raise
        except Exception as error:
            failure = _from_engine_error(error)
            log.finish(failure.status)
            raise failure from None
        finally:
            self.stats["in_flight"] -= 1
        answer = completion.response(outputs)
        log.finish(200)
        return JSONResponse(answer)

    async def _stream(self, engine, body, completion, prompt_ids, params, log) -> Response:
        generator = engine.generate(prompt_ids, params, completion.id)
        self.stats["in_flight"] += 1
        # Wait for the first output before answering, so that an engine error still becomes a
        # real HTTP status instead of a broken 200 stream.
        try:
            first = await generator.__anext__()
        except BaseException as error:
            self.stats["in_flight"] -= 1
            await _close(generator)
            if isinstance(error, StopAsyncIteration):
                error = RuntimeError("the engine finished without output")
            if isinstance(error, Exception):
                failure = _from_engine_error(error)
                log.finish(failure.status)
                raise failure from None
            await engine.abort(completion.id)
            raise

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def frames():
            # Every chunk sent is a hop through Ray Serve's proxy, so each engine step's frames go
            # out as one chunk: the role with the first delta; the last delta, usage and [DONE].
            # (When this loop falls behind, vLLM merges the deltas it produced meanwhile.)
            finished = False
            status = 200
            try:
                pending = completion.role_frames()
                output = first
                while True:
                    pending += completion.delta_frames(output.outputs)
                    if output.finished:
                        break
                    if pending:
                        yield b"".join(pending)
                        pending = []
                    output = await generator.__anext__()
                finished = True
                if include_usage:
                    pending.append(completion.usage_frame())
                yield b"".join(pending) + SSE_DONE
            except StopAsyncIteration:
                finished = True
                yield SSE_DONE
            except Exception as error:
                # Headers are gone already: report the error in the stream itself.
                failure = _from_engine_error(error)
                status = failure.status
                finished = True
                yield _sse(failure.body()) + SSE_DONE
            finally:
                self.stats["in_flight"] -= 1
                if not finished:
                    # The client went away (Serve cancels this generator): free the engine's slot.
                    self.stats["aborted"] += 1
                    status = 499
                    await engine.abort(completion.id)
                await _close(generator)
                log.finish(status)

        return StreamingResponse(frames(), media_type="text/event-stream")

    # -- Checks ------------------------------------------------------------------------------

    async def _admit(self, request: Request, model_class):
        """What a generation request passes first: the key, a valid body, this model, supported fields."""
        self._authorize(request)
        body = await _parse(request, model_class)
        self._check_model(body.model)
        _check_unsupported(body)
        return body

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise OpenAIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(400, f"The model '{name}' is not served here; this server serves "
                              f"'{self.model_name}' (see /v1/models).", param="model", code="model_not_found")


# ---------------------------------------------------------------------------------------------
# 8. The builder: serveConfigV2's `import_path: vllm_app:build_app`, called with `args`.
# ---------------------------------------------------------------------------------------------


def build_app(args: dict) -> serve.Application:
    if not _wait_for_current_code():
        import importlib
        import sys

        # Serve imported the old file; build from the new one.
        return importlib.reload(sys.modules[__name__]).build_app(args)
    try:
        app_args = AppArgs.model_validate(args)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"Invalid vllm_app args: {problems}") from None
    _check_extra_engine_args(app_args.engine.extra_args)
    return VLLMServer.bind(app_args)


def _check_extra_engine_args(extra: dict) -> None:
    """Name a misspelt engine.extraArgs key at deploy time, where vLLM is installed."""
    try:
        import dataclasses

        from vllm import AsyncEngineArgs
    except ImportError:
        return
    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"engine.extraArgs has keys vLLM does not know: {unknown}. "
                         "Use the Python names of vLLM's engine arguments (e.g. max_num_seqs).")
