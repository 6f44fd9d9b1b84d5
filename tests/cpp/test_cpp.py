"""The C++ runtime (runtimes/cpp, built into build/cpp by `make cpp`) against pipo_runtime."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipo_graphs import CONTRACT_VERSION, SamplingParams
from pipo_graphs.seal import write_sealed
from pipo_graphs.rng import uniform
from pipo_runtime.session import GenerationConfig, PipoSession
from pipo_runtime.text import result_dict

BUILD = Path(__file__).resolve().parents[2] / "build" / "cpp"
PIPO_RUN = BUILD / "pipo-run"
UNIT_TESTS = BUILD / "pipo-unit-tests"
API_TESTS = BUILD / "pipo-api-tests"

pytestmark = pytest.mark.skipif(not PIPO_RUN.is_file(), reason="run `make cpp`")

SAMPLED = dict(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)
MODES = ("free", "gate", "skip")


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pipo_run(folder, *args) -> dict:
    return json.loads(run(PIPO_RUN, folder, *args, "--json").stdout)


def ids_flag(prompt) -> str:
    return ",".join(str(int(t)) for t in prompt)


def test_unit_tests_builtin_vectors():
    proc = run(UNIT_TESTS)
    assert proc.stdout.strip().endswith("0 failed")


def test_rng_matches_pipo_graphs():
    rnd = random.Random(5)
    cases = [(0, 0, 0, 0), ((1 << 64) - 1, 7, 3, 1), (1 << 63, (1 << 64) - 1, 0, 1)]
    cases += [(rnd.getrandbits(64), rnd.randrange(1 << 20), rnd.randrange(1 << 16),
               rnd.randrange(2)) for _ in range(200)]
    out = run(UNIT_TESTS, "rng", *[x for c in cases for x in c]).stdout.split()
    expected = [repr(float(np.float32(uniform(*c)))) for c in cases]
    assert out == expected


def test_sha256_matches_hashlib(tmp_path):
    rnd = random.Random(1)
    files = []
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 200_003):
        f = tmp_path / f"f{n}"
        f.write_bytes(bytes(rnd.getrandbits(8) for _ in range(n)))
        files.append(f)
    out = run(UNIT_TESTS, "sha256", *files).stdout.split()
    assert out == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_api_on_export(ort_export):
    """pipo-api-tests: streaming, batch rows vs alone, max_new_tokens, stop ids, errors."""
    proc = run(API_TESTS, ort_export, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(" passed, 0 failed")


def test_fixture_greedy_pairs_exact(ort_export, expected):
    """expected.npz: 2 prompts x 3 gate regimes (free, gate, skip), 12 pairs each."""
    for i in (0, 1):
        prompt = ids_flag(expected[f"prompt{i}"])
        for mode in MODES:
            tau = {"free": -1.0, "gate": float(expected[f"gate{i}"]), "skip": 1.0}[mode]
            out = pipo_run(ort_export, "--ids", prompt, "--max-steps", "12", "--threshold",
                           repr(tau))
            assert out["pairs"] == expected[f"greedy{i}_{mode}"].tolist(), (i, mode)
            # tau >= 1: decode steps skip the confidence head (null); prefill still reports it
            skipped = out["confidence"][1:] if mode == "skip" else []
            assert skipped == [None] * len(skipped)
            assert all(0 <= c <= 1 for c in out["confidence"][:12 - len(skipped)])


@pytest.mark.parametrize("export", ["ort_export", "trt_export"])
def test_seeded_sampling_equals_pipo_runtime(export, request):
    """Same seed, same export: pairs exactly, confidence within 1e-5, same JSON fields."""
    folder = request.getfixturevalue(export)
    prompts = [[5, 9, 13, 300, 2], list(range(100, 123))]
    config = GenerationConfig(max_steps=10, threshold=0.4, sampling=SamplingParams(**SAMPLED),
                              seed=11)
    session = PipoSession.load(folder)
    ref = session.generate(prompts, config).sequences
    session.close()
    out = pipo_run(folder, "--ids", ids_flag(prompts[0]), "--ids", ids_flag(prompts[1]),
                   "--max-steps", "10", "--threshold", "0.4", "--temperature", "1",
                   "--top-p", "0.95", "--top-k", "20", "--presence-penalty", "1.5",
                   "--seed", "11")["results"]
    assert len(out) == 2
    assert any(p[1] == 511 for s in ref for p in s.pairs), "gate never dropped a token2"
    for got, want in zip(out, ref):
        want = result_dict(want)
        assert list(got) == list(want) + ["timings"]
        assert got["pairs"] == want["pairs"]
        assert got["tokens"] == want["tokens"]
        assert got["finish_reason"] == want["finish_reason"]
        assert got["commit_rate"] == want["commit_rate"]
        np.testing.assert_allclose(got["confidence"], want["confidence"], atol=1e-5)
        timings = got["timings"]
        assert set(timings) == {"ttft_ms", "ms_per_step", "ms_per_token", "steps"}
        assert timings["steps"] == 10 and timings["ttft_ms"] > 0 and timings["ms_per_step"] > 0


def test_max_new_tokens_stop_ids_and_penalties_match(ort_export):
    prompt = list(range(30, 47))
    config = GenerationConfig(max_new_tokens=7, stop_token_ids=(3,), threshold=0.5,
                              sampling=SamplingParams(temperature=0.8, min_p=0.05,
                                                      repetition_penalty=1.3), seed=3)
    session = PipoSession.load(ort_export)
    want = result_dict(session.generate([prompt], config).sequences[0])
    session.close()
    got = pipo_run(ort_export, "--ids", ids_flag(prompt), "--max-new-tokens", "7",
                   "--stop-token-ids", "3", "--threshold", "0.5", "--temperature", "0.8",
                   "--min-p", "0.05", "--repetition-penalty", "1.3", "--seed", "3")
    assert got["pairs"] == want["pairs"] and got["tokens"] == want["tokens"]
    assert got["finish_reason"] == want["finish_reason"]


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(folder, out)
    return out


def _manifest_edit(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    write_sealed(path, json.dumps(data))


def _broken(kind: str, ort_export: Path, tmp_path: Path) -> list:
    """(folder, extra args) for each error case."""
    ok = ["--ids", "5,17,300", "--max-steps", "3"]
    if kind == "no folder":
        return [tmp_path / "missing", *ok]
    if kind == "no manifest":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty", *ok]
    folder = _copy(ort_export, tmp_path)
    if kind == "bad json":
        write_sealed(folder / "manifest.json", "{\"format\": ")
    elif kind == "contract":
        _manifest_edit(folder, lambda m: m.update(contract_version="2.0"))
    elif kind == "pad outside":
        _manifest_edit(folder, lambda m: m["model"].update(pad_token_id=512))
    elif kind == "vocab 0":
        _manifest_edit(folder, lambda m: m["model"].update(vocab_size=0))
    elif kind == "checksum":
        data = bytearray((folder / "weights.data").read_bytes())
        data[100] ^= 1
        (folder / "weights.data").write_bytes(bytes(data))
    elif kind == "missing file":
        (folder / "decode_unfold.onnx").unlink()
    elif kind == "id range":
        return [folder, "--ids", "5,512", "--max-steps", "3"]
    elif kind == "empty prompt":
        return [folder, "--ids", "", "--max-steps", "3"]
    elif kind == "context":
        return [folder, "--ids", "5,17,300", "--max-steps", "20000"]
    elif kind == "bad option":
        return [folder, *ok, "--top-p", "0"]
    return [folder, *ok]


ERRORS = {
    "no folder": "no such folder",
    "no manifest": "no manifest.json; not a pipo-export export folder",
    "bad json": "not valid JSON",
    "contract": f"graph contract 2.0, this runtime reads {CONTRACT_VERSION}",
    "pad outside": "manifest.model.pad_token_id [512] outside the vocabulary [0, 512)",
    "vocab 0": "manifest.model.vocab_size is 0, expected >= 1",
    "checksum": "weights.data does not match its sha256",
    "missing file": "decode_unfold.onnx listed in the manifest is missing",
    "id range": "token ids [512] are outside the vocabulary [0, 512)",
    "empty prompt": "--ids needs at least one token id",
    "context": "needs 40004 tokens of context; this export allows 32768",
    "bad option": "top_p must be in (0, 1], got 0",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_errors_exit_2_with_one_line(kind, ort_export, tmp_path):
    proc = run(PIPO_RUN, *_broken(kind, ort_export, tmp_path), "--json", check=False)
    assert proc.returncode == 2, (kind, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ERRORS[kind] in lines[0], lines[0]


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"),
                                        ("--top-p", "nan"), ("--min-p", "-inf"),
                                        ("--presence-penalty", "nan"),
                                        ("--repetition-penalty", "inf"), ("--threshold", "nan"),
                                        ("--threshold", "-inf")])
def test_nan_and_inf_refused_like_python(flag, value, ort_export):
    """pipo-run refuses NaN/inf in every sampling value and the threshold with the message
    pipo_runtime gives for the same request."""
    proc = run(PIPO_RUN, ort_export, "--ids", "5,17", "--max-steps", "2", flag, value, "--json",
               check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    name = flag[2:].replace("-", "_")
    config = GenerationConfig(max_steps=2, **({"threshold": float(value)} if name == "threshold"
                                              else {"sampling": SamplingParams(
                                                  **{name: float(value)})}))
    from pipo_graphs.errors import PipoUserError
    with pytest.raises(PipoUserError) as err:
        PipoSession.load(ort_export).generate([[5, 17]], config)
    assert proc.stderr.strip() == f"error: {err.value}"
