"""The engine's prefill side under graph contract 1.1: prefix-cache lookups, chunked prefill and
the states a finished request leaves in the cache (docs/contract.md, "Continuing a sequence").

Each request carries what it still has to prefill:

    past      the SequenceState it continues (a cache hit, or its own chunks so far), or None
    feed      the tokens to prefill over `past` (a hit: its pending + the prompt's rest)
    consumed  the tokens its states hold (whole pairs, PAD as the model saw it)

A prompt longer than the budget (`EngineConfig.max_prefill_tokens`, rounded down to even) is
prefilled alone in chunks of exactly that many tokens, one per tick, each with next_token = the
next chunk's first token (it emits nothing); the rest joins the batch like any prompt. Both
give exactly the tokens of one whole prefill. On a contract 1.0 export all of this is off: a
request prefills its prompt whole, fresh, and nothing is cached.
"""
from __future__ import annotations

import numpy as np

from pipo_graphs.contract import NEXT_TOKEN, continues

from pipo_runtime.continuation import SequenceState, batch_past, finished_state, row_state
from pipo_runtime.prefix_cache import PrefixCache
from pipo_runtime.session import PipoSession, row_feeds


class EnginePrefill:
    """Lookups, chunks and saved states for one Engine (see the module doc)."""

    def __init__(self, session: PipoSession, max_prefill_tokens: int, cache_bytes: int):
        manifest = session.manifest
        self.enabled = manifest is not None and continues(manifest.contract_version)
        self.chunk = max_prefill_tokens - max_prefill_tokens % 2 if self.enabled else None
        self.cache = PrefixCache(cache_bytes) if self.enabled and cache_bytes else None
        self.session, self.pad, self.width = session, session.facts.pad_id, session._pair_width

    def start(self, request) -> bool | None:
        """Once per request, before its admission: look its prompt up in the cache and set its
        past/feed/consumed (and its result's cached_tokens) -> hit (True/False), None when the
        cache is off."""
        prompt = request.seq.prompt
        hit: SequenceState | None = \
            None if self.cache is None else self.cache.lookup(prompt)
        request.past = hit
        request.feed = list(prompt) if hit is None \
            else list(hit.pending) + list(prompt[len(hit.history):])
        request.consumed = list(hit.consumed) if hit else []
        if hit is not None:
            request.seq.out.cached_tokens = len(hit.consumed)
        return None if self.cache is None else hit is not None

    def needs_chunks(self, request) -> bool:
        """Whether the request's feed exceeds one chunk (never on a 1.0 export)."""
        return self.chunk is not None and len(request.feed) > self.chunk

    def prefill_chunk(self, request) -> int:
        """Prefill the request's next chunk alone; its states become its past -> tokens
        prefilled."""
        tokens, rest = request.feed[:self.chunk], request.feed[self.chunk:]
        runner = self.session.runner.begin()
        try:
            feeds = row_feeds([request.seq], [tokens], self.pad)
            feeds.update(batch_past([request.past]))
            feeds[NEXT_TOKEN] = np.array([rest[0]], np.int64)
            runner.prefill(feeds)
            request.consumed += tokens
            request.past = row_state(runner.outputs(), 0, runner.pair_axes, request.consumed)
        finally:
            runner.end()
        request.feed = rest
        return len(tokens)

    def prefill(self, runner, requests: list) -> tuple[np.ndarray, np.ndarray]:
        """Prefill the requests' feeds as one batch over their pasts (fresh rows start empty;
        saved slots right-aligned) -> pair [B, 2], confidence [B]."""
        feeds = row_feeds([r.seq for r in requests], [r.feed for r in requests], self.pad)
        feeds.update(batch_past([r.past for r in requests]))
        pair, conf = runner.prefill(feeds)
        for r in requests:
            r.consumed += r.feed + [self.pad] * (-len(r.feed) % self.width)
            r.past = None  # held by the batch now
        return pair, conf

    def save(self, runner, rows: list[tuple[int, object]]) -> None:
        """Cache the states of requests that just finished (row index in `runner`'s batch,
        request). Only rows with tau < 1: their batch ran the MTP at every step, so their MTP
        cache is whole (a tau >= 1 batch skips it: docs/contract.md, Limits)."""
        rows = [(i, r) for i, r in rows if r.seq.config.threshold < 1]
        if self.cache is None or not rows:
            return
        outputs = runner.outputs()
        for i, r in rows:
            self.cache.put(finished_state(outputs, i, runner.pair_axes, r.consumed,
                                          r.seq.out.pairs, self.width))
