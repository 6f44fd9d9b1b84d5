"""One HTTP request as engine requests: submit one per choice (prompt x n, seq = the choice's
index), carry the engine's events onto the event loop, and turn them into an OpenAI body or
SSE chunks. Whatever ends the request early (client gone, error) cancels every choice."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from pipo_graphs.errors import PipoUserError
from pipo_runtime.engine import EngineEvent, QueueFull
from pipo_runtime.session import GenerationConfig

from pipo_runtime.serve.protocol import FINISH_REASONS, ApiError, new_id, now, usage
from pipo_runtime.serve.state import ServerState


@dataclass
class Choice:
    """One choice's progress."""

    index: int
    prompt_index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    result: object = None
    first_s: float | None = None
    last_s: float | None = None

    @property
    def finish_reason(self) -> str | None:
        if self.result is None:
            return None
        reason = self.result.finish_reason
        if reason == "cancelled":  # by the engine's shutdown (a client's cancel ends sooner)
            raise ApiError(503, "the server shut down before the request finished",
                           code="shutting_down", type="service_unavailable")
        if reason not in FINISH_REASONS:  # "error": the backend failed on a checked request
            raise ApiError(500, "the backend failed while generating (see the server log)",
                           code="backend_error", type="server_error")
        return FINISH_REASONS[reason]


class Run:
    """The engine requests of one HTTP request."""

    def __init__(self, state: ServerState, prompts: list[list[int]], config: GenerationConfig,
                 n: int, model: str, kind: str):
        self.state, self.prompts, self.config, self.n = state, prompts, config, n
        self.model, self.kind = model, kind  # kind: "text_completion" or "chat.completion"
        self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        self.created = now()
        self.start = time.perf_counter()
        self.choices = [Choice(pi * n + j, pi) for pi in range(len(prompts)) for j in range(n)]
        self.handles = []
        self.queue: asyncio.Queue = asyncio.Queue()

    def submit(self) -> None:
        """Submit every choice; all or nothing (QueueFull -> 429, a bad request -> 400)."""
        engine = self.state.ready()
        limit = self.state.config.max_ongoing
        if len(self.choices) > limit:
            raise ApiError(400, f"{len(self.choices)} choices (prompts x n) exceed what this "
                                f"server holds at once ({limit}); send fewer", "n")
        loop = asyncio.get_running_loop()

        def sink(index):
            def put(event: EngineEvent):
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass
            return put

        try:
            for c in self.choices:
                self.handles.append(engine.submit(self.prompts[c.prompt_index], self.config,
                                                  seq=c.index, sink=sink(c.index)))
        except QueueFull:
            self.cancel()
            raise ApiError(429, f"the server is busy ({self.state.config.max_queue} requests "
                                "waiting); retry later", code="queue_full",
                           type="rate_limit_error") from None
        except PipoUserError as exc:
            self.cancel()
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise ApiError(400, str(exc), code=code) from None
        except RuntimeError:  # shut down between ready() and submit()
            self.cancel()
            raise ApiError(503, "the server is shutting down", code="shutting_down",
                           type="service_unavailable") from None

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, EngineEvent]]:
        """(choice, event) until every choice's last event; observes the latency metrics."""
        m, left = self.state.metrics, len(self.choices)
        while left:
            index, event = await self.queue.get()
            c = self.choices[index]
            t = time.perf_counter()
            if event.tokens:
                if c.first_s is None:
                    c.first_s = t
                    m.ttft.observe(t - self.start)
                else:
                    per_token = (t - c.last_s) / len(event.tokens)
                    for _ in event.tokens:
                        m.itl.observe(per_token)
                c.last_s = t
            c.text += event.text
            c.tokens.extend(event.tokens)
            if event.done:
                left -= 1
                c.result = event.result
                m.e2e.observe(t - self.start)
                m.requests.labels("ok", str(c.result.finish_reason)).inc()
            yield c, event

    def usage(self) -> dict:
        firsts = [c for c in self.choices if c.index % self.n == 0]
        return usage(sum(c.result.prompt_tokens for c in firsts),
                     sum(len(c.result.tokens) for c in self.choices),
                     sum(c.result.cached_tokens for c in firsts))

    # ------------------------------------------------------------------------ bodies
    def _choice_body(self, c: Choice, text: str, extra: dict, tokens=None) -> dict:
        if self.kind == "text_completion":
            body = {"index": c.index, "text": text, "logprobs": None}
        elif "delta" in extra:
            body = {"index": c.index, "delta": extra["delta"], "logprobs": None}
        else:
            body = {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": None}
        body["finish_reason"] = extra.get("finish_reason")
        if tokens is not None:
            body["token_ids"] = tokens
        return body

    async def body(self, return_token_ids: bool) -> dict:
        async for _ in self.events():
            pass
        choices = [self._choice_body(c, c.result.text if c.result.text is not None else c.text,
                                     {"finish_reason": c.finish_reason},
                                     list(c.result.tokens) if return_token_ids else None)
                   for c in self.choices]
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list[dict], usage_field: bool, usage_value=None) -> str:
        obj = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                 "choices": choices}
        if usage_field:
            chunk["usage"] = usage_value
        return json.dumps(chunk, ensure_ascii=False)

    async def chunks(self, include_usage: bool, return_token_ids: bool) -> AsyncIterator[str]:
        """The SSE data lines of a stream, [DONE] last."""
        chat = self.kind != "text_completion"
        if chat:
            for c in self.choices:
                role = {"delta": {"role": "assistant", "content": ""}}
                yield self._chunk([self._choice_body(c, "", role)], include_usage)
        try:
            async for c, event in self.events():
                if not (event.text or event.done or (return_token_ids and event.tokens)):
                    continue
                reason = c.finish_reason if event.done else None
                extra = {"finish_reason": reason}
                if chat:
                    extra["delta"] = {"content": event.text} if event.text else {}
                tokens = list(event.tokens) if return_token_ids else None
                yield self._chunk([self._choice_body(c, event.text, extra, tokens)],
                                  include_usage)
        except ApiError as exc:
            yield json.dumps(exc.body())
            return
        if include_usage:
            yield self._chunk([], True, self.usage())
        yield "[DONE]"
