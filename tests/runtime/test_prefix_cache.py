"""PrefixCache: longest-prefix lookup, byte bound with LRU eviction, hit/miss counts (synthetic
states), and one hit used for real: continuing a cached state equals prefilling whole."""
from __future__ import annotations

import numpy as np
import pytest

from pipo_graphs.contract import ATTENTION_MASK, PAST
from pipo_graphs.errors import PipoUserError
from pipo_runtime import GenerationConfig, PipoSession
from pipo_runtime.continuation import SequenceState
from pipo_runtime.prefix_cache import KEY_BYTES_PER_TOKEN, PrefixCache


def state(history, pending: int = 2, nbytes: int = 100) -> SequenceState:
    """A stand-in state of `nbytes` of arrays whose history is `history`, the last `pending`
    tokens of it pending."""
    history = tuple(history)
    consumed = history[:len(history) - pending]
    arrays = {PAST + ATTENTION_MASK: np.ones((1, len(consumed) // 2), bool),
              PAST + "key.0": np.zeros(nbytes - len(consumed) // 2, np.uint8)}
    return SequenceState(arrays, consumed, history[len(consumed):])


def cost(s: SequenceState) -> int:
    return s.nbytes + KEY_BYTES_PER_TOKEN * len(s.history)


def test_lookup_returns_the_longest_cached_prefix():
    cache = PrefixCache(10_000)
    short, long = state([1, 2, 3, 4]), state([1, 2, 3, 4, 5, 6])
    other = state([1, 2, 7, 8])
    for s in (short, long, other):
        assert cache.put(s)
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7]) is long
    assert cache.lookup([1, 2, 3, 4, 5]) is short  # long is not a prefix of it
    assert cache.lookup([1, 2, 7, 8, 1]) is other
    assert cache.lookup([1, 2, 3]) is None
    assert cache.lookup([5, 1, 2, 3, 4]) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (3, 2, 3)


def test_an_entry_must_leave_a_token_to_prefill():
    """A chunk's state (no pending pair) needs one more token; a finished sequence's state
    (its last pair pending) serves its exact history."""
    cache = PrefixCache(10_000)
    chunk = state([1, 2, 3, 4], pending=0)
    cache.put(chunk)
    assert cache.lookup([1, 2, 3, 4]) is None
    assert cache.lookup([1, 2, 3, 4, 5]) is chunk
    done = state([5, 6, 7, 8])
    cache.put(done)
    assert cache.lookup([5, 6, 7, 8]) is done


def test_byte_bound_evicts_least_recently_used():
    a, b, c = state([1, 1]), state([2, 2]), state([3, 3])
    cache = PrefixCache(cost(a) + cost(b) + cost(c) - 1)  # room for two
    cache.put(a)
    cache.put(b)
    assert cache.lookup([1, 1, 5]) is a  # a is now more recent than b
    cache.put(c)
    assert cache.lookup([2, 2, 5]) is None  # b was evicted
    assert cache.lookup([1, 1, 5]) is a and cache.lookup([3, 3, 5]) is c
    stats = cache.stats()
    assert stats.evictions == 1 and stats.bytes == cost(a) + cost(c) <= stats.max_bytes
    big = state([4, 4], nbytes=stats.max_bytes)
    assert not cache.put(big)  # larger than the whole cache: not stored, nothing evicted
    assert len(cache) == 2
    cache.put(state([1, 1], nbytes=50))  # same history: replaced, bytes recounted
    assert cache.stats().bytes == cost(state([1, 1], nbytes=50)) + cost(c)
    with pytest.raises(PipoUserError, match="bytes >= 0"):
        PrefixCache(-1)


def test_a_cached_state_continues_like_a_whole_prefill(ort_export):
    session = PipoSession.load(ort_export)
    config = GenerationConfig(max_steps=4, threshold=0.3, save_state=True)
    cache = PrefixCache(1 << 24)
    first = session.generate([[5, 6, 7, 8, 9]], config).sequences[0]
    assert cache.put(first.state)
    request = list(first.state.history) + [40, 41, 42]
    hit = cache.lookup(request)
    assert hit is first.state
    got = session.generate([request[len(hit.history):]], config, past=hit).sequences[0]
    want = session.generate([request], config).sequences[0]
    assert got.pairs == want.pairs and got.prompt_tokens - got.cached_tokens == 2 + 3
    assert cache.stats().hits == 1
