"""API misuse and memory limits of PipoSession: a PipoUserError in one line (never an
AttributeError or an allocation that exhausts the machine), raised before any graph runs."""
from __future__ import annotations

import pytest

from pipo_graphs import SamplingParams
from pipo_graphs.errors import PipoUserError
from pipo_graphs.shapes import state_bytes
from pipo_runtime import GenerationConfig, PipoSession
from pipo_runtime.backends.base import RunnerOptions, max_threads


@pytest.fixture(scope="module")
def session(trt_export):
    s = PipoSession.load(trt_export)
    yield s
    s.close()


def _refused(call, match: str) -> None:
    with pytest.raises(PipoUserError) as err:
        call()
    message = str(err.value)
    assert match in message and "\n" not in message, message


@pytest.mark.parametrize("config,match", [
    (None, "config must be a GenerationConfig"),
    ({"max_steps": 2}, "config must be a GenerationConfig"),
    (GenerationConfig(max_steps=2, sampling=None), "sampling must be"),
    (GenerationConfig(max_steps=2, sampling={"temperature": 1.0}), "sampling must be"),
    (GenerationConfig(max_steps=2, stop_strings=("",)), "stop_strings"),
    (GenerationConfig(max_steps=2, stop_strings="end"), "stop_strings"),
], ids=["None", "dict", "sampling None", "sampling dict", "empty stop string",
        "stop_strings a string"])
def test_bad_config_is_one_line(session, config, match):
    _refused(lambda: session.generate([[5, 17]], config), match)
    _refused(lambda: session.stream([[5, 17]], config), match)


def test_closed_session_is_one_line(trt_export):
    s = PipoSession.load(trt_export)
    assert s.generate([[5, 17]], GenerationConfig(max_steps=2)).sequences[0].tokens
    s.close()
    s.close()  # twice is fine
    _refused(lambda: s.generate([[5, 17]], GenerationConfig(max_steps=2)), "closed")


def test_batch_over_max_batch_tokens_is_refused_before_running(session):
    """The probe's 5,000 x 1,000-token batch: refused at once by the default budget."""
    prompts = [[5] * 1000] * 5000
    _refused(lambda: session.stream(prompts, GenerationConfig(max_steps=2)), "max_batch_tokens")


def test_states_over_max_state_bytes_are_refused(trt_export):
    """A stated bytes budget: the batch whose states (past + present) exceed it is refused; one
    that fits runs."""
    probe = PipoSession.load(trt_export)
    one = 2 * state_bytes(probe.manifest.states, 4, 1 + 8)  # 4 rows, 1 prompt pair, 8 steps
    probe.close()
    s = PipoSession.load(trt_export, max_state_bytes=one)
    try:
        assert len(s.generate([[5, 17]] * 4, GenerationConfig(max_steps=8)).sequences) == 4
        _refused(lambda: s.generate([[5, 17]] * 5, GenerationConfig(max_steps=8)),
                 "max_state_bytes")
    finally:
        s.close()


@pytest.mark.parametrize("field,value", [("threads", 1024), ("threads", max_threads() + 1),
                                         ("max_state_bytes", -1), ("max_batch_tokens", 1.5)])
def test_runner_option_ranges(field, value):
    _refused(lambda: RunnerOptions(**{field: value}), field)


def test_sampling_params_still_accepted(session):
    out = session.generate([[5, 17]], GenerationConfig(max_steps=2, sampling=SamplingParams()))
    assert len(out.sequences[0].pairs) == 2
