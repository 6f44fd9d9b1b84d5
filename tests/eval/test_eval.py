"""`pipo-export eval`: its figures against an independent computation (the torch model's
teacher-forced logits, scored here), a float32 export against its own checkpoint, the reference
file round trip, and the refusals (short text, other vocabulary, other tokenizer, other text,
an export without the head values eval reads)."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr

import numpy as np
import pytest

from conftest import TINY_REF, export_folder, run_cli

CONTEXT = 64  # tokens per window: the text below spans several windows, the last one ragged
TEXT = ("PIPO reads pairs of tokens and writes pairs of tokens. The exporter compiles it into two "
        "graphs, and the runtime feeds each step's present states back as the next step's past. "
        "A confidence gate decides whether the second token of a pair is kept; eval measures "
        "how often it is, and how well both tokens are predicted, teacher forced.") * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """pipo-tiny-ref with a byte-level BPE tokenizer sized to its vocabulary (eval reads text)."""
    from pipo_export.model.synthetic import write_tiny_tokenizer
    folder = tmp_path_factory.mktemp("eval") / "tiny-tok"
    shutil.copytree(TINY_REF, folder)
    write_tiny_tokenizer(folder, 512, 510, 511)  # the config's pad is 511
    return folder


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "trace-cache"
    return export_folder(checkpoint.parent / "out", checkpoint, cache)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _eval(export, text, **kw) -> dict:
    from pipo_export.eval.run import EvalOptions, evaluate
    return evaluate(EvalOptions(export=str(export), text=str(text), context=CONTEXT,
                                progress=False, **kw))


def torch_scores(checkpoint, text: str, context: int = CONTEXT):
    """Independent of eval: the checkpoint's torch model, teacher forced on eval's windows of
    `context` tokens, scored here in float64 -> (nll token 1, nll token 2, confidence), each over
    every scored pair (tests/eval/test_fixture.py uses it too)."""
    import torch
    from tokenizers import Tokenizer
    from pipo_export import load_checkpoint
    model = load_checkpoint(checkpoint)
    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    nll1, nll2, conf = [], [], []
    for start in range(0, len(ids), context):
        w = ids[start:start + context]
        w = torch.tensor([w[:len(w) // 2 * 2]])
        if w.shape[1] < 4:
            continue
        with torch.no_grad():
            backbone, mtp, c = model.teacher_forced(w)
        lp1 = torch.log_softmax(backbone[0, :-1].double(), -1)
        lp2 = torch.log_softmax(mtp[0].double(), -1)
        nll1.append(-lp1.gather(1, w[0, 2::2, None])[:, 0])
        nll2.append(-lp2.gather(1, w[0, 3::2, None])[:, 0])
        conf.append(c[0].double())
    return (torch.cat(nll1).numpy(), torch.cat(nll2).numpy(), torch.cat(conf).numpy())


def test_perplexity_and_gate_equal_the_torch_models_teacher_forced_logits(export, checkpoint,
                                                                          text):
    """float32 export vs torch float32: perplexities within 1e-5 relative (logits agree to
    ~1e-6), mean confidence within 1e-6, commit rates exactly (no confidence within 1e-5 of
    a tau here, asserted)."""
    report = _eval(export, text, batch=2)
    nll1, nll2, conf = torch_scores(checkpoint, TEXT)
    assert report["positions"] == len(nll1) > 3 * CONTEXT // 2
    assert report["perplexity"]["token1"] == pytest.approx(np.exp(nll1.mean()), rel=1e-5)
    assert report["perplexity"]["token2"] == pytest.approx(np.exp(nll2.mean()), rel=1e-5)
    gate = report["gate"]
    assert gate["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-6)
    for row in gate["taus"]:
        assert np.abs(conf - row["tau"]).min() > 1e-5
        assert row["commit_rate"] == (conf >= row["tau"]).mean()
        assert row["tokens_per_step"] == 1 + row["commit_rate"]
    assert "reference" not in report


def test_float32_export_against_its_checkpoint(export, checkpoint, text):
    ref = _eval(export, text, reference=str(checkpoint))["reference"]
    for tok in ("token1", "token2"):
        assert ref["kl"][tok]["mean"] < 1e-6 and ref["kl"][tok]["max"] < 1e-5
        assert ref["top1_agreement"][tok] == 1.0
        assert abs(ref["ln_ppl_ratio"][tok]) < 1e-5


def test_saved_reference_round_trip_and_its_checks(export, text, tmp_path):
    saved = tmp_path / "base.ref"
    first = _eval(export, text, save_reference=str(saved))
    assert saved.is_file() and not list(tmp_path.glob(".*tmp*"))
    again = _eval(export, text, reference=str(saved))
    ref = again["reference"]
    assert ref["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert ref["kl"]["token1"]["max"] < 1e-6 and ref["top1_agreement"]["token2"] == 1.0
    assert again["gate"]["reference_mean_confidence"] == pytest.approx(
        first["gate"]["mean_confidence"], abs=1e-7)
    from pipo_graphs.errors import PipoUserError
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    with pytest.raises(PipoUserError, match="another text"):
        _eval(export, other, reference=str(saved))
    from pipo_export.eval.run import EvalOptions, evaluate
    with pytest.raises(PipoUserError, match="--context 64"):
        evaluate(EvalOptions(export=str(export), text=str(text), context=32,
                             reference=str(saved), progress=False))
    for name, blob in (("junk.ref", b"not a reference"), ("cut.ref", saved.read_bytes()[:-4])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(PipoUserError, match="not an eval reference|truncated"):
            _eval(export, text, reference=str(tmp_path / name))


def test_cli_prints_the_table_and_writes_json(export, checkpoint, text, tmp_path):
    out = tmp_path / "report.json"
    proc = run_cli("eval", str(export), "--text", str(text), "--reference", str(checkpoint),
                   "--context", str(CONTEXT), "--json", str(out))
    assert "perplexity token 1" in proc.stdout and "KL(ref || export)" in proc.stdout
    assert "0.50" in proc.stdout and "tokens/step" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["tau"] for r in report["gate"]["taus"]] == [0.3, 0.5, 0.7, 0.9]


def _refused(*args) -> str:
    proc = run_cli("eval", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_text_shorter_than_a_pair_is_one_line(export, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("P")
    assert "at least 4" in _refused(str(export), "--text", str(short))


def test_reference_with_another_vocabulary_is_refused(export, text, tmp_path):
    from pipo_export.model.synthetic import write_tiny_checkpoint
    other = write_tiny_checkpoint(tmp_path / "v320")  # vocabulary 320, its own tokenizer
    line = _refused(str(export), "--text", str(text), "--reference", str(other))
    assert "320 tokens" in line and "512" in line


def test_reference_with_another_tokenizer_is_refused(export, checkpoint, text, tmp_path):
    other = tmp_path / "swapped"
    shutil.copytree(checkpoint, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    line = _refused(str(export), "--text", str(text), "--reference", str(other))
    assert "tokenizer maps" in line and repr(a) in line


def test_export_without_the_head_values_is_refused(export):
    import onnx
    from pipo_graphs.errors import PipoUserError
    from pipo_export.eval.graphs import TOKEN2_LOGITS, eval_graph
    model = onnx.load(str(export / "decode_unfold.onnx"), load_external_data=False)
    eval_graph(onnx.ModelProto.FromString(model.SerializeToString()), 512)  # as exported: fine
    for graph in [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.g.node]:
        for node in graph.node:
            node.output[:] = [o + ".old" if o == TOKEN2_LOGITS else o for o in node.output]
    with pytest.raises(PipoUserError, match="re-export"):
        eval_graph(model, 512)


def test_progress_bar_on_stderr():
    from pipo_export.eval.run import Progress
    err = io.StringIO()
    with redirect_stderr(err):
        bar = Progress(10, enabled=True, after=0.0)
        for _ in range(10):
            bar(1)
        bar.close()
    assert "eval [" in err.getvalue() and "10/10 pairs" in err.getvalue()
    quiet = io.StringIO()
    with redirect_stderr(quiet):
        Progress(10, enabled=True, after=60.0)(10)
    assert quiet.getvalue() == ""


def test_eval_runs_without_torch(export, text, tmp_path):
    """Scoring an export, saving and reading a reference file: numpy + onnxruntime only (a
    child process in which `import torch` and transformers raise ImportError)."""
    import subprocess
    import sys
    block = ("import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
             "from pipo_export.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    saved = tmp_path / "base.ref"
    for extra in (["--save-reference", str(saved)], ["--reference", str(saved)]):
        proc = subprocess.run([sys.executable, "-c", block, "eval", str(export), "--text",
                               str(text), "--context", str(CONTEXT), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "perplexity token 2" in proc.stdout
    assert "top-1 agree" in proc.stdout
