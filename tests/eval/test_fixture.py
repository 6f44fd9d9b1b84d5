"""The trained quality fixture (tests/data/pipo-fixture, tools/train_fixture.py): it has learned,
its float32 export is its torch model, and quantization moves its tokens and its gate by no more
than benchmarks/README.md's measured table allows (bounds below, each with its margin).

The text is the first TEXT_CHARS characters of the fixture's held-out text, so the suite stays
inside CI's time; benchmarks/quality.py scores the whole file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, export_folder
from test_eval import torch_scores

FIXTURE = DATA / "pipo-fixture"
TEXT_CHARS = 40_000
CONTEXT = 512
# Measured on the whole held-out text (benchmarks/README.md, Quality; benchmarks/quality.py):
#   int8: KL mean 7.9e-5 / 7.3e-5, top-1 agreement 99.0 % / 99.1 %, commit rates equal to
#         float32's at every tau;
#   int4: KL mean 6.6e-3 / 6.5e-3, top-1 agreement 91.7 % / 92.1 %, commit rates within 1.7
#         points of float32's (0.7: 35.7 % against 37.4 %).
# Bounds, loosened for the shorter text: KL x2.3-3.8, agreement -4 points, commit +2-3 points.
# (max mean KL of token 1, of token 2, min top-1 agreement of token 1, of token 2, max |commit
# rate - float32's| at each tau)
BOUNDS = {
    "int8": (3e-4, 3e-4, 0.95, 0.95, 0.02),
    "int4": (0.015, 0.015, 0.87, 0.87, 0.04),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("fixture-text") / "heldout-part.txt"
    path.write_text((FIXTURE / "heldout.txt").read_text(encoding="utf-8")[:TEXT_CHARS],
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """float32, int8 and int4 (the export's defaults: block 32, symmetric, accuracy level 4)."""
    cache = tmp_path_factory.getbasetemp() / "trace-cache-fixture"
    root = tmp_path_factory.mktemp("fixture")
    return {"float32": export_folder(root / "float32", FIXTURE, cache),
            "int8": export_folder(root / "int8", FIXTURE, cache, weights="int8"),
            "int4": export_folder(root / "int4", FIXTURE, cache, weights="int4")}


@pytest.fixture(scope="module")
def reference(exports, text, tmp_path_factory):
    """The float32 export's scores, saved once (eval --save-reference) -> (file, its report)."""
    path = tmp_path_factory.mktemp("fixture-ref") / "float32.reference"
    return path, _eval(exports["float32"], text, save_reference=str(path))


def _eval(export, text, **kw) -> dict:
    from pipo_export.eval.run import EvalOptions, evaluate
    return evaluate(EvalOptions(export=str(export), text=str(text), context=CONTEXT,
                                progress=False, **kw))


def test_fixture_has_learned_and_eval_equals_torch(reference, text):
    """eval's perplexities equal the torch model's teacher-forced ones (1e-4 relative: float32
    graphs against float64 scoring of float32 logits); both are far below the unigram model's
    (recorded by the training script), and the gate is neither shut nor always open."""
    _, report = reference
    nll1, nll2, conf = torch_scores(FIXTURE, text.read_text(encoding="utf-8"), CONTEXT)
    for tok, nll in (("token1", nll1), ("token2", nll2)):
        assert report["perplexity"][tok] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
    assert report["gate"]["mean_confidence"] == pytest.approx(float(conf.mean()), abs=1e-5)
    unigram = json.loads((FIXTURE / "metrics.json").read_text())["figures"]["unigram_perplexity"]
    assert report["perplexity"]["token1"] < unigram / 4
    assert report["perplexity"]["token2"] < unigram / 4
    at = {round(t["tau"], 2): t["commit_rate"] for t in report["gate"]["taus"]}
    assert 0.1 < at[0.5] < 0.9


def test_float32_export_is_the_torch_model(exports, text):
    """float32 export against the checkpoint run by torch float32: mean KL below 1e-6 for both
    tokens, top-1 agreement 100 %."""
    report = _eval(exports["float32"], text, reference=str(FIXTURE))
    ref = report["reference"]
    for tok in ("token1", "token2"):
        assert ref["kl"][tok]["mean"] < 1e-6
        assert ref["top1_agreement"][tok] == 1.0


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_within_the_measured_bounds(exports, reference, text, kind):
    path, base = reference
    report = _eval(exports[kind], text, reference=str(path))
    kl1, kl2, agree1, agree2, commit = BOUNDS[kind]
    ref = report["reference"]
    assert 0 < ref["kl"]["token1"]["mean"] <= kl1  # quantization moves, within the bound
    assert ref["kl"]["token2"]["mean"] <= kl2
    assert ref["top1_agreement"]["token1"] >= agree1
    assert ref["top1_agreement"]["token2"] >= agree2
    for mine, theirs in zip(report["gate"]["taus"], base["gate"]["taus"]):
        assert abs(mine["commit_rate"] - theirs["commit_rate"]) <= commit
