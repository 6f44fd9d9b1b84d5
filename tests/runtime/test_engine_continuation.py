"""Contract 1.1 through the engine: a conversation resumed from the prefix cache, a long prompt
prefilled in chunks between other requests' decode steps, eviction under a byte bound, and a
contract 1.0 export running with both off.

Every comparison is against PipoSession.generate of the whole raw history (PAD included) from
scratch, alone: pairs and tokens exact, confidences within 1e-4 (the batch and the chunking
change the summation order)."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from pipo_graphs.contract import INPUT_IDS, LENGTHS, NEXT_TOKEN
from pipo_runtime import GenerationConfig, PipoSession, SamplingParams
from pipo_runtime.engine import Engine, EngineConfig

PAD = 511  # pipo-tiny-ref's pad_token_id
CONFIG = GenerationConfig(max_steps=6, threshold=0.3, seed=7,
                          sampling=SamplingParams(temperature=0.8, top_k=20,
                                                  presence_penalty=1.5, repetition_penalty=1.2))


@pytest.fixture(scope="module")
def session(ort_export):
    s = PipoSession.load(ort_export)
    yield s
    s.close()


class Log:
    """Records, in order, each prefill the runner runs (tokens fed, whether it was a chunk) and
    the events sinks receive; patched on the runner's class (the engine's copies count too)."""

    def __init__(self, session, monkeypatch):
        cls, self.entries = type(session.runner), []
        original = cls.prefill

        def prefill(runner, feeds):
            chunk = NEXT_TOKEN in feeds and bool((np.asarray(feeds[NEXT_TOKEN]) >= 0).any())
            self.entries.append(("prefill", int(np.sum(feeds[LENGTHS])), chunk,
                                 feeds[INPUT_IDS].shape))
            return original(runner, feeds)

        monkeypatch.setattr(cls, "prefill", prefill)

    def sink(self, name):
        return lambda event: self.entries.append(("event", name, len(event.tokens)))

    def fed(self) -> int:
        return sum(e[1] for e in self.entries if e[0] == "prefill")


def alone(session, prompt, config, seq=0):
    return session.generate([prompt], replace(config, seq_offset=seq)).sequences[0]


def same(got, want):
    assert got.pairs == want.pairs and got.tokens == want.tokens
    assert got.finish_reason == want.finish_reason
    assert np.abs(np.array(got.confidence) - want.confidence).max() < 1e-4


def raw_history(prompt, result) -> list[int]:
    """What the model read and emitted: the prompt (one PAD if odd) and every raw pair."""
    return list(prompt) + [PAD] * (len(prompt) % 2) + [t for p in result.pairs for t in p]


def test_conversation_resumes_from_the_prefix_cache(session, monkeypatch):
    """5 turns: each sends the whole raw history + new tokens; the engine prefills only the
    pending pair and the new tokens, and gives exactly the whole history from scratch."""
    log = Log(session, monkeypatch)
    engine = Engine(session, EngineConfig(max_batch=4, cache_bytes=1 << 26))
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, PAD, 9).tolist()
    try:
        for turn in range(5):
            log.entries.clear()
            got = engine.submit(prompt, CONFIG, seq=1).result(timeout=120)
            fed = log.fed()  # the engine's prefills (before `alone` runs its own)
            same(got, alone(session, prompt, CONFIG, seq=1))
            assert got.prompt_tokens == len(prompt)
            if turn:
                new = len(prompt) - len(history)
                assert fed == new + 2 == got.prompt_tokens - got.cached_tokens
                assert got.cached_tokens == len(history) - 2
            else:
                assert fed == len(prompt) and got.cached_tokens == 0
            history = raw_history(prompt, got)
            prompt = history + rng.integers(0, PAD, 3 + turn % 2).tolist()  # odd and even
        stats = engine.stats()
        assert (stats.prefix_hits, stats.prefix_misses) == (4, 1)
    finally:
        engine.shutdown()


def test_a_history_that_differs_by_a_pad_misses(session):
    """The cache key is the raw history: the same conversation without its PAD is a miss (and
    still gives the tokens of its own prompt from scratch)."""
    engine = Engine(session, EngineConfig(cache_bytes=1 << 26))
    try:
        first = [5, 6, 7]
        got = engine.submit(first, CONFIG).result(timeout=120)
        without_pad = first + [t for p in got.pairs for t in p] + [40, 41]
        again = engine.submit(without_pad, CONFIG).result(timeout=120)
        same(again, alone(session, without_pad, CONFIG))
        assert again.cached_tokens == 0 and engine.stats().prefix_hits == 0
    finally:
        engine.shutdown()


def test_chunked_prefill_streams_other_requests_between_chunks(session, monkeypatch):
    """A 700-token prompt in chunks of 128 while a running request decodes: the same tokens as
    one prefill, and the running request gets tokens between the long one's chunks."""
    log = Log(session, monkeypatch)
    engine = Engine(session, EngineConfig(max_batch=4, max_prefill_tokens=128))
    rng = np.random.default_rng(5)
    long_prompt = rng.integers(0, PAD, 700).tolist()
    short = [3, 4, 5]
    steady = GenerationConfig(max_steps=40, seed=2, ignore_eos=True)
    try:
        running = engine.submit(short, steady, seq=0, sink=log.sink("short"))
        while not any(e[:2] == ("event", "short") for e in list(log.entries)):
            time.sleep(0.005)  # it is decoding
        got = engine.submit(long_prompt, CONFIG, seq=3).result(timeout=300)
        running.result(timeout=300)
    finally:
        engine.shutdown()
    entries = list(log.entries)
    same(got, alone(session, long_prompt, CONFIG, seq=3))
    chunks = [i for i, e in enumerate(entries) if e[0] == "prefill" and e[2]]
    assert len(chunks) == 700 // 128 and all(entries[i][1] == 128 for i in chunks)
    for a, b in zip(chunks, chunks[1:]):
        assert any(e[:2] == ("event", "short") for e in entries[a:b]), (a, b)
    last = next(e for e in entries[chunks[-1] + 1:] if e[0] == "prefill")
    assert last[1] == 700 - 128 * len(chunks) and not last[2]  # the rest, with the batch


def test_cache_evicts_under_a_small_byte_bound(session):
    """A bound that holds one state: the second conversation evicts the first, whose next turn
    then misses (and still gives the tokens from scratch)."""
    config = replace(CONFIG, ignore_eos=True)  # every state the same size
    engine = Engine(session, EngineConfig(cache_bytes=1 << 26))
    probe = engine.submit([9, 8, 7, 6], config).result(timeout=120)
    engine.shutdown()
    one = engine._prefill.cache.stats().bytes  # what one such state costs
    engine = Engine(session, EngineConfig(cache_bytes=one + one // 2))
    try:
        a = engine.submit([9, 8, 7, 6], config).result(timeout=120)
        same(a, probe)
        engine.submit([1, 2, 3, 4], config).result(timeout=120)
        cache = engine._prefill.cache.stats()
        assert cache.entries == 1 and cache.evictions == 1 and cache.bytes <= one + one // 2
        follow = raw_history([9, 8, 7, 6], a) + [20, 21]
        got = engine.submit(follow, config).result(timeout=120)
        same(got, alone(session, follow, config))
        assert got.cached_tokens == 0 and engine.stats().prefix_hits == 0
    finally:
        engine.shutdown()


def test_contract_1_0_runs_without_chunks_or_cache(session, monkeypatch):
    """On a 1.0 export the engine prefills a long prompt whole and caches nothing (no error)."""
    monkeypatch.setattr(session.manifest, "contract_version", "1.0")
    log = Log(session, monkeypatch)
    engine = Engine(session, EngineConfig(max_prefill_tokens=64, cache_bytes=1 << 26))
    prompt = list(range(1, 201))
    try:
        got = engine.submit(prompt, CONFIG).result(timeout=120)
        again = engine.submit(raw_history(prompt, got) + [5], CONFIG).result(timeout=120)
    finally:
        engine.shutdown()
    monkeypatch.undo()
    same(got, alone(session, prompt, CONFIG))
    assert engine._prefill.cache is None and again.cached_tokens == 0
    assert [e[1] for e in log.entries if e[0] == "prefill"][0] == 200
    assert not any(e[2] for e in log.entries if e[0] == "prefill")


def test_a_tau_1_request_is_not_cached(session):
    """A tau >= 1 request alone skips the MTP at decode (its states lack those MTP slots), so
    it leaves nothing in the cache: its next turn at tau < 1 still equals the whole history."""
    engine = Engine(session, EngineConfig(cache_bytes=1 << 26))
    try:
        first = [5, 6, 7, 8]
        got = engine.submit(first, replace(CONFIG, threshold=1.0)).result(timeout=120)
        follow = raw_history(first, got) + [30, 31, 32]
        again = engine.submit(follow, CONFIG).result(timeout=120)
        same(again, alone(session, follow, CONFIG))
        assert again.cached_tokens == 0 and len(engine._prefill.cache) == 1  # `again` only
    finally:
        engine.shutdown()
