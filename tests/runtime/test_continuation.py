"""Contract 1.1 through PipoSession: resumed conversations, chunked prefill, odd lengths, and
the refusal on contract 1.0 exports. Every comparison is against generating the whole history
from scratch (a fresh prefill of the raw history, PAD included), on the same backend."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipo_graphs.contract import INPUT_IDS, LENGTHS, NEXT_TOKEN, PAST
from pipo_graphs.errors import PipoUserError
from pipo_runtime import Backend, GenerationConfig, PipoSession, SamplingParams
from pipo_runtime.backends.base import prefill_extras
from pipo_runtime.requests import GraphInput

PAD = 511  # pipo-tiny-ref's pad_token_id
# penalties on, sampled, gated: every piece of state (masks, MTP cache, RNG) matters
CONFIG = GenerationConfig(max_steps=6, threshold=0.3, seed=7, save_state=True,
                          sampling=SamplingParams(temperature=0.8, top_k=20,
                                                  presence_penalty=1.5, repetition_penalty=1.2))
RUNS = {"ort-contrib": (Backend.ONNXRUNTIME, "ort"), "ort-standard": (Backend.ONNXRUNTIME, "trt"),
        "onnx-reference": (Backend.ONNX_REFERENCE, "trt")}


class Counting:
    """Records each prefill a session's runner runs (input_ids shape, lengths, whether past
    states were fed): patched on the runner's class, so the per-generation copies count too."""

    def __init__(self, session: PipoSession, monkeypatch):
        cls, self.calls = type(session.runner), []
        original = cls.prefill

        def prefill(runner, feeds):
            self.calls.append((feeds[INPUT_IDS].shape, feeds[LENGTHS].tolist(),
                               any(k.startswith(PAST) for k in feeds)))
            return original(runner, feeds)

        monkeypatch.setattr(cls, "prefill", prefill)


@pytest.fixture(scope="module")
def sessions(ort_export, trt_export):
    folders = {"ort": ort_export, "trt": trt_export}
    out = {run: PipoSession.load(folders[f], backend=b) for run, (b, f) in RUNS.items()}
    yield out
    for s in out.values():
        s.close()


@pytest.mark.parametrize("run", list(RUNS))
def test_resumed_conversation_equals_whole_history(sessions, run, monkeypatch):
    """5 turns (onnx-reference: 3, it is slow), each continuing the last one's saved states:
    exactly the pairs of generating from the raw history + new tokens from scratch, with only
    the new tokens (and the pending pair) prefilled."""
    session = sessions[run]
    counter = Counting(session, monkeypatch)
    rng = np.random.default_rng(0)
    state = None
    for turn in range(3 if run == "onnx-reference" else 5):
        new = rng.integers(0, PAD, 3 + 2 * turn + turn % 2).tolist()  # odd and even turns
        counter.calls.clear()
        got = session.generate([new], CONFIG, past=state).sequences[0]
        fed = sum(sum(lengths) for _, lengths, _ in counter.calls)
        history = list(state.history) + new if state else new
        want = session.generate([history], CONFIG).sequences[0]
        assert got.pairs == want.pairs, f"turn {turn}"
        assert np.abs(np.array(got.confidence) - want.confidence).max() < 1e-4
        assert fed == len(new) + (2 if state else 0) == got.prompt_tokens - got.cached_tokens
        assert got.cached_tokens == (len(state.consumed) if state else 0)
        if turn:
            assert fed < len(history)
        state = got.state
        # the state holds the history but the last pair, whole pairs, PAD as the model saw
        assert state.pending == tuple(got.pairs[-1])
        assert len(state.consumed) % 2 == 0
        assert state.slots == len(state.consumed) // 2


def test_batched_continuation_of_rows_with_holes(sessions):
    """Prompts of one batch differ in length (the shorter row has holes); each saved state
    drops its holes, and continuing them together (padded back to one width) equals continuing
    each alone."""
    session = sessions["ort-contrib"]
    first = session.generate([[5, 6, 7], list(range(100, 141))], CONFIG).sequences
    assert [s.state.slots for s in first] == [2 + 5, 21 + 5]  # prompt pairs + 5 decode steps
    new = [[9, 10, 11, 12], [13]]
    together = session.generate(new, CONFIG, past=[s.state for s in first]).sequences
    for row, seq in enumerate(together):
        alone = session.generate([new[row]], replace(CONFIG, seq_offset=row),
                                 past=first[row].state).sequences[0]
        assert seq.pairs == alone.pairs


@pytest.mark.parametrize("run", ["ort-contrib", "ort-standard"])
def test_chunked_prefill_equals_one_prefill(sessions, run, monkeypatch):
    """Prompts of several hundred tokens prefilled in chunks of 64 (mixed lengths: rows drop
    out of the chunk calls as their prompt runs short) give the pairs of one prefill."""
    session = sessions[run]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, PAD, n).tolist() for n in (301, 37, 200)]
    config = replace(CONFIG, save_state=False)
    whole = session.generate(prompts, config).sequences
    counter = Counting(session, monkeypatch)
    chunked = session.generate(prompts, replace(config, prefill_chunk=64)).sequences
    widths = [shape[1] for shape, _, _ in counter.calls]
    assert len(counter.calls) == 5 and max(widths) == 64  # 4 chunks of the longest, then all
    for a, b in zip(whole, chunked):
        assert a.pairs == b.pairs
        assert np.abs(np.array(a.confidence) - b.confidence).max() < 1e-4


def test_odd_lengths(sessions):
    """An odd prompt reads one PAD; an odd continuation (pending pair + new tokens) gets one
    PAD too; an odd chunk size is refused (chunks hold whole pairs)."""
    session = sessions["ort-contrib"]
    first = session.generate([[5, 6, 7]], CONFIG).sequences[0].state
    assert first.consumed[:4] == (5, 6, 7, PAD)
    second = session.generate([[8]], CONFIG, past=first).sequences[0]
    pairs_before = len(first.consumed) // 2
    # pending pair + [8] is odd: one PAD, then the 6 steps' pairs but the last
    assert second.state.consumed[:len(first.history) + 2] == first.history + (8, PAD)
    assert second.state.slots == pairs_before + 2 + 5
    with pytest.raises(PipoUserError, match="prefill_chunk must be an even integer"):
        session.generate([[1, 2, 3]], replace(CONFIG, prefill_chunk=63))


def test_continuation_refused_on_contract_1_0(sessions, monkeypatch):
    """A contract 1.0 export loads and generates, but continuing a sequence on it is refused
    with one line: at the session (from the manifest) and in the runners (from the graph)."""
    session = sessions["ort-contrib"]
    state = session.generate([[5, 6]], CONFIG).sequences[0].state
    monkeypatch.setattr(session.manifest, "contract_version", "1.0")
    with pytest.raises(PipoUserError, match="contract 1.0.*cannot continue a sequence"):
        session.generate([[1]], CONFIG, past=state)
    with pytest.raises(PipoUserError, match="contract 1.0"):
        session.generate([[1, 2, 3]], replace(CONFIG, prefill_chunk=2))
    v10 = [GraphInput("input_ids", "int64", ("batch", "2*prompt_pairs"))]
    assert prefill_extras(v10, {INPUT_IDS: np.zeros((1, 2), np.int64)}, 1) == {}
    with pytest.raises(PipoUserError, match="contract 1.0"):
        prefill_extras(v10, {NEXT_TOKEN: np.zeros(1, np.int64)}, 1)


def test_torch_backend_resumes_like_the_exports(tiny_ref, sessions):
    """The torch reference continues sequences too, with the exports' pairs."""
    torch_session = PipoSession.load(tiny_ref, backend=Backend.TORCH)
    ort = sessions["ort-contrib"]
    a = torch_session.generate([[5, 6, 7]], CONFIG).sequences[0]
    b = ort.generate([[5, 6, 7]], CONFIG).sequences[0]
    assert a.pairs == b.pairs and a.state.history == b.state.history
    a2 = torch_session.generate([[40, 41]], CONFIG, past=a.state).sequences[0]
    b2 = ort.generate([[40, 41]], CONFIG, past=b.state).sequences[0]
    assert a2.pairs == b2.pairs


def test_regular_mode_resumes_token_by_token(regular_export):
    """Regular decoding (one token per slot, pair[1] always PAD): its history holds each step's
    token only, an odd prompt reads no PAD, and resuming equals the whole history."""
    session = PipoSession.load(regular_export)
    first = session.generate([[5, 6, 7]], CONFIG).sequences[0]
    assert first.state.consumed[:3] == (5, 6, 7) and len(first.state.pending) == 1
    assert first.state.slots == len(first.state.consumed) == 3 + 5
    got = session.generate([[8, 9]], CONFIG, past=first.state).sequences[0]
    want = session.generate([list(first.state.history) + [8, 9]], CONFIG).sequences[0]
    assert got.pairs == want.pairs and got.prompt_tokens - got.cached_tokens == 3
