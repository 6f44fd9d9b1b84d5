"""One PipoSession shared by 8 threads: 100 mixed generate/stream calls each equal the serial
results exactly (tokens, finish reasons, confidences)."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor


from pipo_runtime import GenerationConfig, PipoSession, SamplingParams

THREADS, CALLS = 8, 100


def _calls(n: int) -> list[tuple[str, list[list[int]], GenerationConfig]]:
    """n seeded requests: greedy and sampled, batch 1-3, prompts of 1-40 tokens, 1-6 steps."""
    rng = random.Random(1234)
    out = []
    for i in range(n):
        prompts = [[rng.randrange(1, 200) for _ in range(rng.randint(1, 40))]
                   for _ in range(rng.randint(1, 3))]
        sampling = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 20]),
                                  top_p=rng.choice([1.0, 0.9]),
                                  presence_penalty=rng.choice([0.0, 1.5]))
        config = GenerationConfig(max_steps=rng.randint(1, 6), seed=i,
                                  threshold=rng.choice([-1.0, 0.3, 0.6]), sampling=sampling)
        out.append(("stream" if i % 2 else "generate", prompts, config))
    return out


def _run(session: PipoSession, call) -> list[tuple]:
    how, prompts, config = call
    if how == "generate":
        result = session.generate(prompts, config)
    else:
        stream = session.stream(prompts, config)
        streamed = [[] for _ in prompts]
        for event in stream:
            streamed[event.row].extend(event.tokens)
        result = stream.result
        assert streamed == [s.tokens for s in result.sequences]
    return [(tuple(s.tokens), tuple(map(tuple, s.pairs)), tuple(s.confidence), s.finish_reason)
            for s in result.sequences]


def test_shared_session_threads_equal_serial(trt_export):
    session = PipoSession.load(trt_export, threads=1)
    calls = _calls(THREADS * CALLS)
    serial = [_run(session, c) for c in calls]
    with ThreadPoolExecutor(THREADS) as pool:  # thread t takes calls t, t+8, t+16, ...
        chunks = list(pool.map(lambda t: [_run(session, c) for c in calls[t::THREADS]],
                               range(THREADS)))
    concurrent = [None] * len(calls)
    for t, chunk in enumerate(chunks):
        concurrent[t::THREADS] = chunk
    mismatches = [i for i, (a, b) in enumerate(zip(serial, concurrent)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(calls)} calls differ, first {mismatches[:5]}"
    session.close()
