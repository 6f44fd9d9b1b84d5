"""The engine (continuous batching): every request gives exactly what it gives alone, rows never
bleed into each other, cancellation frees rows, text streams never retract.

Tolerance: pairs, tokens and finish reasons exact; confidences within `pipo-export compare`'s
default (atol 1e-3 relative to scale_of the reference: CompareArgs.atol), because the batch
size and the holes change the summation order of the GEMMs and the attention.
"""
from __future__ import annotations

import json
import random
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from pipo_export.cli.compare import CompareArgs
from pipo_graphs.tolerance import scale_of
from pipo_runtime import GenerationConfig, PipoSession, PipoUserError, SamplingParams
from pipo_runtime.backends import rows as host_rows
from pipo_runtime.engine import Engine, EngineConfig, QueueFull
from pipo_runtime.sequence import TextStream

FUZZ_REQUESTS = 60  # the 200 run once: see fuzz_requests / the report
MAX_PROMPT = 600
SAMPLERS = (SamplingParams(),
            SamplingParams(repetition_penalty=1.3, presence_penalty=0.5),  # greedy, penalized
            SamplingParams(temperature=1.0, top_k=20, top_p=0.95, presence_penalty=1.5),
            SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05),
            SamplingParams(temperature=1.3, top_k=50, repetition_penalty=1.1))


def codeword(i: int) -> list[int]:
    """Three tokens that no other request of a fuzz run carries in that order."""
    return [400 + i % 100, 300 + (i // 100) % 100, 7]


def fuzz_requests(n: int, seed: int, max_prompt: int = MAX_PROMPT, max_steps: int = 24):
    """n seeded requests: (prompt with its codeword, GenerationConfig, seq, delay before it)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, max_prompt)
        prompt = [rng.randrange(0, 500) for _ in range(length)]
        at = rng.randrange(0, max(length - 2, 1))
        prompt[at:at + 3] = codeword(i)
        limit = {"max_steps": rng.randint(1, max_steps)} if rng.random() < 0.6 else \
            {"max_new_tokens": rng.randint(1, 2 * max_steps)}
        stop = (rng.randrange(0, 500),) if rng.random() < 0.2 else ()
        config = GenerationConfig(**limit, threshold=rng.choice([-1.0, 0.3, 0.6, 1.0]),
                                  sampling=rng.choice(SAMPLERS), seed=rng.randrange(1 << 32),
                                  stop_token_ids=stop)
        out.append((prompt, config, rng.randrange(0, 4), rng.random() * 0.004))
    return out


def run_engine(session, requests, config: EngineConfig):
    """Submit with the requests' delays (arrival times), collect every result (the queue holds
    them all)."""
    engine = Engine(session, replace(config, max_queue=max(config.max_queue, len(requests))))
    handles = []
    for prompt, gen, seq, delay in requests:
        time.sleep(delay)
        handles.append(engine.submit(prompt, gen, seq=seq))
    results = [h.result(timeout=300) for h in handles]
    stats = engine.stats()
    engine.shutdown()
    return results, stats


def mismatches(session, requests, results) -> tuple[list[str], list[int]]:
    """Each request alone (PipoSession, seq_offset = its seq) vs its engine result
    -> (mismatches, near ties).

    A near tie: the pairs differ from alone, but the same request in a plain two-row batch (a
    copy of it as the second row; no merge, no holes) gives exactly the engine's pairs. Then
    the batch size alone flips a sampling decision (ONNX Runtime's GEMMs round differently for
    one row than for several), which no other row's content caused; bleed would not reproduce
    with a copy of the request as the only neighbour."""
    bad, ties = [], []
    for i, ((prompt, gen, seq, _), got) in enumerate(zip(requests, results)):
        config = replace(gen, seq_offset=seq)
        want = session.generate([prompt], config).sequences[0]
        if (got.pairs, got.tokens, got.finish_reason) != (want.pairs, want.tokens,
                                                          want.finish_reason):
            pair = session.generate([prompt, prompt], config).sequences[0]
            if (got.pairs, got.tokens, got.finish_reason) == (pair.pairs, pair.tokens,
                                                              pair.finish_reason):
                ties.append(i)
                continue
            bad.append(f"request {i}: pairs {got.pairs} != alone {want.pairs}")
            continue
        atol = CompareArgs.atol * scale_of(np.array(want.confidence))
        if not np.allclose(got.confidence, want.confidence, atol=atol, rtol=0):
            bad.append(f"request {i}: confidence {got.confidence} != alone {want.confidence}")
    return bad, ties


@pytest.fixture(scope="module")
def session(ort_export):
    s = PipoSession.load(ort_export, threads=1)
    yield s
    s.close()


def test_fuzz_each_request_equals_itself_alone(session):
    """FUZZ_REQUESTS requests (random arrivals, prompts of 1-600 tokens, samplers, tau, seeds,
    limits, stop ids) through max_batch 8 give exactly what each gives alone."""
    requests = fuzz_requests(FUZZ_REQUESTS, seed=19)
    results, stats = run_engine(session, requests, EngineConfig(max_batch=8,
                                                                max_prefill_tokens=1024))
    bad, ties = mismatches(session, requests, results)
    assert not bad and len(ties) <= max(1, len(requests) // 50), (bad, ties)
    assert stats.steps > 0 and stats.prompt_tokens == sum(len(r[0]) for r in requests)
    assert stats.pairs == sum(len(r.pairs) for r in results)
    assert stats.generated_tokens == sum(len(r.tokens) for r in results)
    assert all(r.prompt_tokens == len(q[0]) for r, q in zip(results, requests))


def test_cross_bleed_is_caught_when_rows_are_mixed(session, monkeypatch):
    """The check above must fail when rows touch each other: merge swaps the recurrent state
    of the first two rows of the batch, and the engine's results no longer equal alone."""
    requests = fuzz_requests(12, seed=5, max_prompt=80, max_steps=12)
    # the codewords make every request distinguishable: alone, no two give the same pairs
    alone = [session.generate([p], replace(g, seq_offset=s)).sequences[0].pairs
             for p, g, s, _ in requests]
    assert len({str(a) for a in alone if len(a) > 2}) == len([a for a in alone if len(a) > 2])
    merge = host_rows.merge_rows

    def mixed(a, b, axes):
        out = merge(a, b, axes)
        if len(out[host_rows.MASK]) >= 2:
            name = "present.recurrent.0"
            out[name] = out[name].copy()
            out[name][[0, 1]] = out[name][[1, 0]]
        return out
    monkeypatch.setattr(host_rows, "merge_rows", mixed)
    results, _ = run_engine(session, [r[:3] + (0.0,) for r in requests], EngineConfig(max_batch=4))
    assert mismatches(session, requests, results)[0], "rows were mixed and the check passed"


def test_onnx_reference_rows_equal_each_request_alone(trt_export):
    """The host row operations on onnx's reference evaluator (tensorrt-target export)."""
    reference = PipoSession.load(trt_export, backend="onnx-reference")
    requests = fuzz_requests(5, seed=3, max_prompt=40, max_steps=5)
    results, _ = run_engine(reference, requests, EngineConfig(max_batch=3))
    assert mismatches(reference, requests, results) == ([], [])
    reference.close()


def test_cancel_frees_the_row_and_leaves_the_others_alone(session):
    config = GenerationConfig(max_steps=400, threshold=0.5, seed=3, sampling=SAMPLERS[2])
    prompts = [[5, 17, 300, i] for i in range(3)]
    engine = Engine(session, EngineConfig(max_batch=2))
    handles = [engine.submit(p, config, seq=i) for i, p in enumerate(prompts)]
    queued = engine.submit([9, 9], config, seq=7)  # behind a full batch
    queued.cancel()
    events = iter(handles[0])
    got = [next(events) for _ in range(5)]  # the first row is running
    handles[0].cancel()
    handles[0].cancel()  # idempotent
    cancelled = handles[0].result(timeout=60)
    rest = [h.result(timeout=120) for h in handles[1:]]
    assert cancelled.finish_reason == "cancelled" and queued.result().finish_reason == "cancelled"
    assert queued.result().pairs == []
    alone = [session.generate([p], replace(config, seq_offset=i)).sequences[0]
             for i, p in enumerate(prompts)]
    assert cancelled.tokens == alone[0].tokens[:len(cancelled.tokens)]
    assert sum(len(e.tokens) for e in got) <= len(cancelled.tokens) < len(alone[0].tokens)
    assert [r.pairs for r in rest] == [a.pairs for a in alone[1:]]
    stats = engine.stats()
    assert stats.cancelled == 2 and stats.running == 0 and stats.waiting == 0
    engine.shutdown()


def test_queue_full_shutdown_and_request_checks(session):
    engine = Engine(session, EngineConfig(max_batch=1, max_queue=2))
    long = GenerationConfig(max_steps=3000)
    first = engine.submit([1, 2, 3], long)
    next(iter(first))  # running: the next two wait
    waiting = [engine.submit([4], long), engine.submit([5], long)]
    with pytest.raises(QueueFull):
        engine.submit([6], long)
    with pytest.raises(PipoUserError, match="max_new_tokens"):
        engine.submit([1], GenerationConfig(max_new_tokens=0))
    with pytest.raises(PipoUserError, match="outside the vocabulary"):
        engine.submit([100000], long)
    with pytest.raises(PipoUserError, match="one prompt"):
        engine.submit([[1], [2]], long)
    engine.shutdown(drain_timeout=0)
    assert {h.result(timeout=1).finish_reason for h in [first, *waiting]} == {"cancelled"}
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([1], long)
    with pytest.raises(PipoUserError, match="max_batch"):
        EngineConfig(max_batch=0)


def test_sink_receives_every_event_from_the_scheduler_thread(session):
    engine = Engine(session, EngineConfig())
    events, threads = [], set()

    def sink(event):
        events.append(event)
        threads.add(threading.current_thread().name)
    handle = engine.submit([5, 17, 300], GenerationConfig(max_steps=6, seed=1), sink=sink)
    result = handle.result(timeout=60)
    engine.shutdown()
    assert threads == {"pipo-engine"} and events[-1].done and events[-1].result is result
    assert [t for e in events for t in e.tokens] == result.tokens
    assert [e.step for e in events] == sorted(e.step for e in events)


def test_decode_steps_copy_no_cache_to_the_host(session, monkeypatch):
    """onnxruntime: per decode step only pair and confidence reach the host (OrtValue.numpy);
    the caches are copied when rows join or leave, not per step."""
    import onnxruntime as ort
    calls = []
    numpy = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: calls.append(1) or numpy(self))
    engine = Engine(session, EngineConfig(max_batch=4))
    handles = [engine.submit([5, 17, i], GenerationConfig(max_steps=100 + i)) for i in range(3)]
    for h in handles:
        h.result(timeout=60)
    steps = engine.stats().steps
    engine.shutdown()
    # every array a join or leave copies: outputs of a step and the sampling inputs
    arrays = len(session.runner.names[session.runner.dec]) + 7
    per_step = 2  # pair, confidence
    # 3 prefills, 101 decode steps; copying the caches each step would add ~20 calls a step
    bound = per_step * (steps + 3) + 6 * (2 * arrays + 2)
    assert steps == 101 and len(calls) <= bound, (len(calls), bound)


def test_host_row_operations_keep_rows_aligned():
    """merge pads with holes on the left and right-aligns newcomers, select keeps rows in order,
    trim drops the columns that are a hole in every row."""
    axes = {"present.key.0": 2, host_rows.MASK: 1}

    def batch(rows, slots, holes):  # row r: value r+1 in real slots
        mask = np.ones((rows, slots), bool)
        key = np.zeros((rows, 1, slots, 2), np.float32)
        for r in range(rows):
            mask[r, slots - holes[r]:] = False  # a prefill's holes are on the right
            key[r, :, :slots - holes[r]] = r + 1
        return {"present.key.0": key, host_rows.MASK: mask, "pair": np.arange(rows)[:, None]}
    a = host_rows.align_right(batch(2, 3, [0, 0]), axes)
    b = host_rows.align_right(batch(2, 5, [0, 3]), axes)
    assert b[host_rows.MASK].tolist() == [[True] * 5, [False] * 3 + [True] * 2]
    merged = host_rows.merge_rows(a, b, axes)
    assert merged[host_rows.MASK].tolist() == [[False] * 2 + [True] * 3] * 2 + \
        b[host_rows.MASK].tolist()
    assert merged["present.key.0"][:, 0, :, 0].tolist() == [[0, 0, 1, 1, 1], [0, 0, 2, 2, 2],
                                                           [1] * 5, [0, 0, 0, 2, 2]]
    kept = host_rows.trim_columns(host_rows.select_rows(merged, [3, 1]), axes)
    assert kept[host_rows.MASK].tolist() == [[False, True, True], [True] * 3]
    assert kept["pair"][:, 0].tolist() == [1, 1]
    assert host_rows.trim_columns(kept, axes) is kept  # nothing to drop: no copy


# ------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def text_session(ort_export, tmp_path_factory):
    """The tiny export with a byte-level BPE tokenizer.json (tokenizers) over its vocabulary,
    added to the files table and resealed (pipo_runtime reads only sealed files)."""
    from pipo_export.model.synthetic import write_tiny_tokenizer
    from pipo_graphs.manifest import file_entries
    from pipo_graphs.seal import write_sealed
    folder = tmp_path_factory.mktemp("text") / "export"
    shutil.copytree(ort_export, folder)
    write_tiny_tokenizer(folder, 512, 510, 511)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_entries(folder, [*manifest["files"], "tokenizer.json"])
    write_sealed(folder / "manifest.json", json.dumps(manifest, indent=2))
    s = PipoSession.load(folder, threads=1)
    yield s
    s.close()


def test_text_stream_decodes_utf8_incrementally(text_session):
    tok = text_session.tokenizer
    text = "Engineers ship héllo wörld ✓ 漢字 🙂 models exactly."
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    deltas = [stream.push([t]) for t in ids] + [stream.push([], final=True)]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 10  # streamed, not all at the end


def test_stop_string_spanning_two_steps_never_leaks(text_session):
    """A stop string whose head comes one step and tail the next: the stream stops before it,
    nothing of it is emitted, and the deltas add up to the final text (no retraction)."""
    config = GenerationConfig(max_steps=30, threshold=-1.0, sampling=SAMPLERS[2], seed=11)
    events = list(text_session.stream("The exporter writes", config))
    full = "".join(e.text for e in events)
    tok = text_session.tokenizer
    tokens, ends = [], []
    for e in events:
        tokens += e.tokens
        ends.append(len(tok.decode(tokens)))
    boundary = next(b for b in ends if 3 <= b <= len(full) - 3
                    and full.find(full[b - 2:b + 2]) == b - 2)  # first occurrence spans a step
    stop = full[boundary - 2:boundary + 2]
    cut = boundary - 2
    for run in ("session", "engine"):
        stopped = replace(config, stop_strings=(stop,))
        if run == "session":
            deltas = [e.text for e in text_session.stream("The exporter writes", stopped)]
            result = text_session.generate("The exporter writes", stopped).sequences[0]
        else:
            engine = Engine(text_session, EngineConfig())
            handle = engine.submit("The exporter writes", stopped)
            deltas = [e.text for e in handle]
            result = handle.result()
            engine.shutdown()
        assert "".join(deltas) == result.text == full[:cut], run
        assert result.finish_reason == "stop", run


def test_request_over_the_state_budget_is_refused_at_submit(ort_export):
    """A request whose states alone exceed RunnerOptions.max_state_bytes is refused when it is
    submitted (one line, nothing queued), as PipoSession refuses it; one that fits runs.
    Fails with the check in Engine.submit removed: the request is queued and runs."""
    from pipo_graphs.shapes import state_bytes
    probe = PipoSession.load(ort_export)
    budget = 2 * state_bytes(probe.manifest.states, 1, 1 + 8)  # 1 row, 1 prompt pair, 8 steps
    probe.close()
    s = PipoSession.load(ort_export, max_state_bytes=budget)
    engine = Engine(s, EngineConfig(max_batch=2))
    try:
        assert len(engine.submit([5, 17], GenerationConfig(max_steps=8)).result(timeout=60)
                   .pairs) == 8
        with pytest.raises(PipoUserError, match="max_state_bytes"):
            engine.submit([5, 17], GenerationConfig(max_steps=64))
        assert engine.stats().waiting == 0
    finally:
        engine.shutdown()
        s.close()
