"""What one server (or one Ray replica) holds: the session, its engine, the chat template and
the request defaults, loaded once; and how a request's prompts become token ids."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from pipo_graphs.errors import PipoUserError
from pipo_runtime.backends.base import RunnerOptions
from pipo_runtime.engine import Engine, EngineConfig
from pipo_runtime.requests import token_ids
from pipo_runtime.session import PipoSession
from pipo_runtime.text import encode

from pipo_runtime.serve.chat import ChatTemplate
from pipo_runtime.serve.config import FALLBACK_MAX_TOKENS, GenerationDefaults, ServeConfig
from pipo_runtime.serve.metrics import ServerMetrics
from pipo_runtime.serve.protocol import ApiError, Defaults

log = logging.getLogger("pipo_runtime.serve")
GENERATION_CONFIG = "generation_config.json"


def generation_defaults(folder: Path, mode: GenerationDefaults) -> Defaults:
    """OpenAI's defaults, overridden (mode auto) by the export's generation_config.json, which
    the exporter copies from the checkpoint and seals in the manifest."""
    path = folder / GENERATION_CONFIG
    if mode == GenerationDefaults.NONE or not path.is_file():
        return Defaults()
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipoUserError(f"{path}: not JSON ({exc}); fix it or pass --generation-config "
                            "none") from None
    if not isinstance(gen, dict):
        raise PipoUserError(f"{path}: expected a JSON object; pass --generation-config none")
    return Defaults().with_generation_config(gen)


class ServerState:
    """Loaded by `load()` (in a thread; /health answers 503 until it is done)."""

    def __init__(self, config: ServeConfig, on_fatal: Callable[[str], None] | None = None):
        self.config, self.on_fatal = config, on_fatal
        self.session: PipoSession | None = None
        self.engine: Engine | None = None
        self.template: ChatTemplate | None = None
        self.defaults = Defaults()
        self.error: str | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # time.monotonic()
        self.responding = 0  # responses being produced (changed on the event loop only)
        self.loaded = threading.Event()
        self.metrics = ServerMetrics(lambda: self.engine)

    def load(self) -> None:
        c = self.config
        try:
            folder = Path(c.out)
            options = RunnerOptions(providers=tuple(c.providers), threads=c.threads,
                                    spinning=False)
            session = PipoSession.load(folder, options=options)
            self.template = ChatTemplate.load(folder)
            self.defaults = generation_defaults(folder, c.generation_config)
            self.session = session
            self.engine = Engine(session, EngineConfig(
                max_batch=c.max_batch, max_queue=c.max_queue,
                max_prefill_tokens=c.max_prefill_tokens, cache_bytes=c.cache_bytes))
            log.info("serving %s as %r", folder, c.model_name)
        except Exception as exc:  # reported by /health and to the process
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PipoUserError) \
                else str(exc)
            log.error("could not load %s: %s", c.out, self.error)
            if self.on_fatal:
                self.on_fatal(self.error)
            if not isinstance(exc, PipoUserError):
                raise
        finally:
            self.loaded.set()

    def begin_drain(self) -> None:
        """Stop admitting (new requests get 503); the drain deadline starts now."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout
        self.draining = True

    def busy(self) -> bool:
        """Requests still being answered (streams still being written included)."""
        stats = self.engine.stats() if self.engine is not None else None
        return self.responding > 0 or bool(stats and (stats.running or stats.waiting))

    def close(self) -> None:
        """Let running requests finish until the drain deadline, then cancel them."""
        self.begin_drain()
        if self.engine is not None:
            self.engine.shutdown(max(0.0, self.drain_deadline - time.monotonic()))
        if self.session is not None:
            self.session.close()

    def ready(self) -> Engine:
        """The engine, or 503 while loading, after a failed load and while draining."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           type="service_unavailable")
        if self.engine is None:
            what = f"the model failed to load: {self.error}" if self.error else \
                "the model is loading; retry shortly"
            raise ApiError(503, what, code="model_loading", type="service_unavailable")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.config.model_name!r} (GET /v1/models)", "model",
                           "model_not_found")

    # ------------------------------------------------------------------------ prompts
    def encode(self, text: str, param: str) -> list[int]:
        if self.session.tokenizer is None:
            raise ApiError(400, "this export has no tokenizer.json, so prompts must be token "
                                "ids", param, "no_tokenizer")
        return encode(self.session.tokenizer, text, self.config.out)

    def completion_prompts(self, prompt) -> list[list[int]]:
        """A completion's prompt (text, ids, or a list of either) -> lists of ids."""
        if isinstance(prompt, str):
            return [self.encode(prompt, "prompt")]
        if not prompt:
            raise ApiError(400, "prompt is empty: give text, token ids or a list of them",
                           "prompt")
        if isinstance(prompt[0], int):
            return [token_ids(prompt, "prompt")]
        return [self.encode(p, "prompt") if isinstance(p, str) else token_ids(p, "prompt")
                for p in prompt]

    def chat_prompt(self, messages, add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
        if self.template is None:
            raise ApiError(400, "this export has no chat template (the checkpoint had no "
                                "chat_template.jinja or tokenizer_config.json chat_template); "
                                "use /v1/completions", "messages", "no_chat_template")
        kwargs = dict(kwargs or {})
        if "add_generation_prompt" in kwargs:
            add_generation_prompt = bool(kwargs.pop("add_generation_prompt"))
        text = self.template.render(messages, add_generation_prompt, **kwargs)
        return self.encode(text, "messages")

    def max_tokens(self, requested: int | None, prompts: list[list[int]]) -> int:
        """The tokens to generate: the request's, else the server's default capped by the
        context left after the longest prompt (the engine checks explicit ones)."""
        if requested is not None:
            return requested
        default = self.config.default_max_tokens or self.defaults.max_tokens \
            or FALLBACK_MAX_TOKENS
        facts = self.session.facts
        longest = max(len(p) + len(p) % 2 for p in prompts)
        room = (facts.max_context - longest) // 2  # each step may add as few as one token
        if room < 1:
            raise ApiError(400, f"the prompt has {longest} tokens; this export's context is "
                                f"{facts.max_context} tokens, with room for none to generate",
                           "prompt", "context_length_exceeded")
        return min(default, room)
