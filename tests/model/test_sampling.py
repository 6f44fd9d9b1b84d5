"""Sampler and counter-based RNG: checked against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipo_export.model.sampling import add_tokens, gate, sample, sampling_tensors
from pipo_graphs import SamplingParams, step_uniforms, uniform

V = 40


def _np_sample(logits, p: SamplingParams, seen_prompt, seen_out, u):
    """Straightforward numpy version of the documented algorithm (independent of torch)."""
    x = logits.astype(np.float64).copy()
    seen = seen_prompt | seen_out
    x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    x[seen_out] -= p.presence_penalty
    if p.temperature == 0:
        return int(np.argmax(x))
    x = x / p.temperature
    order = np.argsort(-x, kind="stable")
    vals = x[order]
    keep = np.ones(V, bool) if p.top_k == 0 else np.arange(V) < p.top_k
    probs = np.where(keep, np.exp(vals - vals.max()), 0)
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep &= before < p.top_p
    keep &= probs >= p.min_p * probs[0]
    probs = np.where(keep, probs, 0)
    cdf = np.cumsum(probs)
    return int(order[min(int((cdf <= u * cdf[-1]).sum()), V - 1)])


CASES = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
         SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=1.0, min_p=0.2),
         SamplingParams(temperature=1.0, presence_penalty=1.5, repetition_penalty=1.3, top_k=20,
                        top_p=0.95)]


@pytest.mark.parametrize("params", CASES, ids=lambda p: str(vars(p)))
def test_sampler_matches_numpy_definition(params):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, V)).astype(np.float32) * 3
    prompt = rng.random((64, V)) < 0.2
    out = rng.random((64, V)) < 0.1
    u = rng.random(64).astype(np.float32)
    sp = sampling_tensors(params, 64, threshold=-1.0)
    got = sample(torch.from_numpy(logits), sp, torch.from_numpy(prompt), torch.from_numpy(out),
                 torch.from_numpy(u), cap=V).tolist()
    want = [_np_sample(logits[i], params, prompt[i], out[i], float(u[i])) for i in range(64)]
    assert got == want


@pytest.mark.parametrize("params", CASES + [
    SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=2.0)],
    ids=lambda p: str(vars(p)))
def test_greedy_branch_keeps_the_definition(params):
    """sample(greedy_branch=True) (the onnxruntime lowering's If) picks what the definition
    picks: the argmax alone only when every row is greedy without penalties; greedy rows with
    penalties, and batches mixing greedy and sampled rows, take the full sampler."""
    rng = np.random.default_rng(1)
    b = 16
    logits = rng.normal(size=(b, V)).astype(np.float32) * 3
    prompt, out = rng.random((b, V)) < 0.3, rng.random((b, V)) < 0.2
    u = rng.random(b).astype(np.float32)
    for mixed in (False, True):
        sp = sampling_tensors(params, b, threshold=-1.0)
        rows = [params] * b
        if mixed:  # one row of another kind makes the whole batch take the full sampler
            other = SamplingParams(temperature=0.9, top_k=7)
            rows[3] = other
            for name, value in sampling_tensors(other, 1, threshold=-1.0).items():
                sp[name][3] = value[0]
        got = sample(torch.from_numpy(logits), sp, torch.from_numpy(prompt),
                     torch.from_numpy(out), torch.from_numpy(u), cap=V, greedy_branch=True)
        want = [_np_sample(logits[i], rows[i], prompt[i], out[i], float(u[i])) for i in range(b)]
        assert got.tolist() == want


def test_uniform_selects_across_distribution():
    """u sweeps the inverse CDF: frequencies follow the softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    u = torch.from_numpy(np.array([uniform(1, i, 0, 0) for i in range(4000)], dtype=np.float32))
    sp = sampling_tensors(SamplingParams(temperature=1.0), 4000, -1.0)
    mask = torch.zeros(4000, 4, dtype=torch.bool)
    tokens = sample(logits, sp, mask, mask, u, cap=4).numpy()
    freq = np.bincount(tokens, minlength=4) / 4000
    assert np.abs(freq - torch.softmax(logits[0], 0).numpy()).max() < 0.03


def test_gate_regimes():
    t2 = torch.tensor([5, 6, 7])
    conf = torch.tensor([0.2, 0.5, 0.9])
    assert gate(t2, conf, torch.full((3,), -1.0), 0).tolist() == [5, 6, 7]
    assert gate(t2, conf, torch.full((3,), 0.5), 0).tolist() == [0, 6, 7]
    assert gate(t2, conf, torch.full((3,), 1.0), 0).tolist() == [0, 0, 0]


def test_pad_never_counted():
    mask = add_tokens(torch.zeros(2, 8, dtype=torch.bool), torch.tensor([[3, 7], [7, 1]]), pad_id=7)
    assert mask.nonzero().tolist() == [[0, 3], [1, 1]]


def _splitmix_reference(seed, seq, step, slot):
    """The generator written from its docstring with numpy uint64 (wrap-around) arithmetic."""
    with np.errstate(over="ignore"):
        def mix(z):
            z = np.uint64(z)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))
        g = np.uint64(0x9E3779B97F4A7C15)
        h = mix(np.uint64(seed) + g)
        for c in (seq, step, slot):
            h = mix(h ^ (np.uint64(c) + g))
        return float(int(h >> np.uint64(40))) / 2 ** 24


def test_rng_matches_uint64_reference_and_is_float32_exact():
    for args in [(0, 0, 0, 0), (7, 2, 5, 1), (2**63 + 5, 1000, 123456, 0)]:
        assert uniform(*args) == _splitmix_reference(*args)
    u = step_uniforms(42, [0, 1, 2], 3)
    assert u.dtype == np.float32 and u.shape == (3, 2) and (u >= 0).all() and (u < 1).all()
    assert float(u[1, 1]) == uniform(42, 1, 3, 1)  # 24-bit values survive float32 exactly
    assert len({float(x) for x in u.ravel()}) == 6
