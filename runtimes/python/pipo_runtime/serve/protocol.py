"""The OpenAI wire format: request models (OpenAI's parameters plus vLLM's extras), their
translation into a GenerationConfig, response bodies and OpenAI-shaped errors.

Parameters the runtime cannot honour (logprobs, logit_bias, a nonzero frequency_penalty, echo,
best_of, suffix) and unknown ones answer 400 naming the parameter; nothing is silently ignored.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pipo_graphs import SamplingParams
from pipo_runtime.session import GenerationConfig

# SequenceResult.finish_reason -> OpenAI's ("eos" and a stop id or string are all "stop")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    # vLLM's extras (extra_body)
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    threshold: float | None = None  # the confidence gate tau
    return_token_ids: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    echo: bool = False
    best_of: StrictInt | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    top_logprobs: StrictInt | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Defaults:
    """Server-side defaults of a request: OpenAI's, then the export's generation_config.json
    (--generation-config auto), then the server's --default-max-tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    threshold: float = GenerationConfig.threshold
    max_tokens: int | None = None

    # generation_config.json key -> field (as vLLM's --generation-config auto reads it)
    HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "min_p": "min_p", "repetition_penalty": "repetition_penalty",
               "max_new_tokens": "max_tokens"}

    def with_generation_config(self, gen: dict) -> "Defaults":
        """These defaults overridden by a generation_config.json's sampling fields; do_sample
        false means greedy, as in transformers."""
        values = {field: gen[key] for key, field in self.HF_KEYS.items()
                  if isinstance(gen.get(key), (int, float)) and not isinstance(gen[key], bool)}
        if gen.get("do_sample") is False:
            values["temperature"] = 0.0
        return replace(self, **values)


def _unsupported(req: _Request) -> None:
    """400 for a parameter the runtime cannot honour."""
    checks = [("logprobs", req.logprobs not in (None, False, 0)),
              ("logit_bias", bool(req.logit_bias)),
              ("frequency_penalty", req.frequency_penalty not in (None, 0, 0.0))]
    if isinstance(req, CompletionRequest):
        checks += [("echo", req.echo), ("best_of", req.best_of not in (None, 1)),
                   ("suffix", req.suffix is not None)]
    if isinstance(req, ChatCompletionRequest):
        checks += [("top_logprobs", req.top_logprobs not in (None, 0))]
    for name, used in checks:
        if used:
            raise ApiError(400, f"{name} is not supported by this server (PIPO's graphs sample "
                                f"inside the model and return no logits); remove it", name,
                           "unsupported_parameter")


def _number(value, name: str, default: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", name)
    return value


def generation_config(req: _Request, defaults: Defaults, max_tokens: int) -> GenerationConfig:
    """The request as pipo_runtime's GenerationConfig (ranges are checked by the engine's
    submit, which raises PipoUserError). max_tokens: the tokens to generate, already resolved."""
    _unsupported(req)
    if max_tokens < 1:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) \
            is not None else "max_tokens"
        raise ApiError(400, f"{param} must be >= 1, got {max_tokens}", param)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    top_k = defaults.top_k if req.top_k is None else req.top_k
    sampling = SamplingParams(
        temperature=_number(req.temperature, "temperature", defaults.temperature),
        top_k=0 if top_k == -1 else top_k,  # vLLM: -1 disables top-k
        top_p=_number(req.top_p, "top_p", defaults.top_p),
        min_p=_number(req.min_p, "min_p", defaults.min_p),
        presence_penalty=_number(req.presence_penalty, "presence_penalty",
                                 defaults.presence_penalty),
        repetition_penalty=_number(req.repetition_penalty, "repetition_penalty",
                                   defaults.repetition_penalty))
    seed = secrets.randbits(63) if req.seed is None else req.seed
    return GenerationConfig(max_new_tokens=max_tokens,
                            threshold=_number(req.threshold, "threshold", defaults.threshold),
                            sampling=sampling, seed=seed,
                            stop_token_ids=tuple(req.stop_token_ids or ()),
                            stop_strings=tuple(stops), ignore_eos=req.ignore_eos)


def requested_max_tokens(req: _Request) -> int | None:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's request validation errors -> one 400 naming the first bad parameter."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if loc[:1] == ["prompt"] and err.get("type") != "missing":  # a union: name the shapes
        return ApiError(400, "prompt must be text, a list of token ids, a list of texts or a "
                             "list of token id lists", "prompt")
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown parameter {param!r}: this server takes OpenAI's "
                             "parameters and vLLM's extras (see docs/serving.md)", param,
                        "unknown_parameter")
    if err.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{err.get('msg', 'invalid value')}", param)
