"""PipoSession requests: bad prompts and configs raise PipoUserError (one line) before any graph
runs; a seeded fuzz (bounded in count and time) never sees any other exception."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from pipo_graphs import SamplingParams
from pipo_graphs.errors import PipoUserError
from pipo_runtime import GenerationConfig, PipoSession

OK = GenerationConfig(max_steps=2)
BAD_REQUESTS = {
    "float id": ([5, 1.5], OK, "1.5"),
    "bool id": ([5, True], OK, "True"),
    "string in ids": ([[5, "7"]], OK, "'7'"),
    "None prompt": ([None], OK, "NoneType"),
    "None prompts": (None, OK, "NoneType"),
    "float array": (np.array([5.0, 7.0]), OK, "float64"),
    "3-D array": (np.zeros((1, 2, 2), dtype=np.int64), OK, "2-D int64"),
    "empty batch": ([], OK, "empty"),
    "empty prompt": ([[5], []], OK, "empty"),
    "id outside": ([5, 512], OK, "512"),
    "negative id": (np.array([5, -1]), OK, "-1"),
    "threshold text": ([5], GenerationConfig(max_steps=2, threshold="0.5"), "threshold"),
    "threshold nan": ([5], GenerationConfig(max_steps=2, threshold=math.nan), "threshold"),
    "max_steps float": ([5], GenerationConfig(max_steps=2.5), "max_steps"),
    "max_steps bool": ([5], GenerationConfig(max_steps=True), "max_steps"),
    "no limit": ([5], GenerationConfig(), "max_steps"),
    "seed negative": ([5], GenerationConfig(max_steps=2, seed=-1), "seed"),
    "seed float": ([5], GenerationConfig(max_steps=2, seed=1.0), "seed"),
    "top_k float": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(top_k=2.0)),
                    "top_k"),
    "top_k huge": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(top_k=1 << 70)),
                   "top_k"),
    "temperature text": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(
        temperature="hot")), "temperature"),
    "temperature inf": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(
        temperature=math.inf)), "temperature"),
    "repetition inf": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(
        repetition_penalty=math.inf)), "repetition_penalty"),
    "presence nan": ([5], GenerationConfig(max_steps=2, sampling=SamplingParams(
        presence_penalty=math.nan)), "presence_penalty"),
    "stop id outside": ([5], GenerationConfig(max_steps=2, stop_token_ids=(600,)), "600"),
    "stop id float": ([5], GenerationConfig(max_steps=2, stop_token_ids=(1.5,)), "1.5"),
}


@pytest.fixture(scope="module")
def session(trt_export):
    s = PipoSession.load(trt_export)
    yield s
    s.close()


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_bad_request_is_one_line_user_error(session, case, call):
    prompts, config, match = BAD_REQUESTS[case]
    with pytest.raises(PipoUserError) as err:
        getattr(session, call)(prompts, config)  # stream checks when called, not when iterated
    message = str(err.value)
    assert "\n" not in message and match in message, message


def test_two_d_integer_array_is_a_batch(session):
    batch = np.array([[5, 17, 300], [9, 8, 7]], dtype=np.int32)
    got = session.generate(batch, OK).sequences
    want = session.generate([[5, 17, 300], [9, 8, 7]], OK).sequences
    assert [s.pairs for s in got] == [s.pairs for s in want]


FUZZ_CALLS, FUZZ_SECONDS = 3000, 60


def _value(rng: random.Random):
    return rng.choice([0, 1, -1, 0.5, 2, 1e30, -1e-9, math.nan, math.inf, -math.inf, True, None,
                       "1", 1 << 64, 40, 0.95, 1.0])


def test_fuzzed_requests_only_raise_user_errors(session):
    """Seeded: 3,000 random requests (or 60 s) mixing valid and invalid fields; each either runs
    or raises PipoUserError, and a valid one gives the same tokens as a clean rerun."""
    rng, start, ran = random.Random(2024), time.monotonic(), 0
    for i in range(FUZZ_CALLS):
        if time.monotonic() - start > FUZZ_SECONDS:
            break
        fields = {n: (_value(rng) if rng.random() < 0.3 else d) for n, d in (
            ("temperature", rng.choice([0.0, 0.8])), ("top_k", rng.choice([0, 5])),
            ("top_p", rng.choice([1.0, 0.9])), ("min_p", 0.0), ("presence_penalty", 0.0),
            ("repetition_penalty", 1.0))}
        prompt = [rng.choice([rng.randrange(512), _value(rng)]) if rng.random() < 0.1
                  else rng.randrange(512) for _ in range(rng.randint(0, 12))]
        config = GenerationConfig(
            max_steps=_value(rng) if rng.random() < 0.2 else rng.randint(1, 4),
            threshold=_value(rng) if rng.random() < 0.2 else 0.5,
            seed=_value(rng) if rng.random() < 0.1 else i,
            sampling=SamplingParams(**fields))
        try:
            result = session.generate([prompt], config)
        except PipoUserError as exc:
            assert "\n" not in str(exc)
            continue
        ran += 1
        again = session.generate([prompt], config)
        assert result.sequences[0].pairs == again.sequences[0].pairs
    assert ran > 20  # the fuzz also exercised valid requests
