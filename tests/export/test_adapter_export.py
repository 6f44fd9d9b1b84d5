"""A peft-written adapter + released-style base, exported with --base (and a two-adapter
release, --base BASE --adapter SFT --adapter OPD): the export's greedy tokens equal those of
peft's merge_and_unload model (merged twice for the stack; torch reference), exactly."""
from __future__ import annotations

import json

import pytest

from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_runtime import GenerationConfig, PipoSession

from conftest import export_folder, run_cli
from peft_pairs import PROMPT, build, build_stack


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build(tmp_path_factory.mktemp("adapter-pair"))


def test_export_with_base_gives_peft_merged_tokens(pair, tmp_path, trace_cache):
    base, adapter, merged = pair
    want = ReferenceDecoder(merged).generate([PROMPT], GenerateOptions(max_steps=10))[0]
    out = export_folder(tmp_path / "out", adapter, trace_cache, base=str(base))
    got = PipoSession.load(out).generate([PROMPT], GenerationConfig(max_steps=10)).sequences[0]
    assert got.pairs == want.pairs


def test_run_adapter_with_base_on_torch_gives_peft_merged_tokens(pair):
    """`run ADAPTER --base BASE` (torch, merged in process) vs peft's merge_and_unload model."""
    base, adapter, merged = pair
    want = ReferenceDecoder(merged).generate([PROMPT], GenerateOptions(max_steps=10))[0]
    proc = run_cli("run", str(adapter), "--base", str(base), "--backend", "torch",
                   "--ids", ",".join(map(str, PROMPT)), "--max-steps", "10", "--json")
    assert json.loads(proc.stdout)["pairs"] == want.pairs


def test_adapter_without_base_is_one_line(pair, tmp_path):
    proc = run_cli("export", str(pair[1]), "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "--base BASE is required" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return build_stack(tmp_path_factory.mktemp("adapter-stack"))


def test_export_of_a_two_adapter_release_gives_peft_sequential_tokens(stack, tmp_path,
                                                                        trace_cache):
    """`export --base BASE --adapter SFT --adapter OPD`: the tokens of peft's sequential
    merge; the manifest records the stack and the torch backend re-merges it."""
    base, adapters, merged = stack
    want = ReferenceDecoder(merged).generate([PROMPT], GenerateOptions(max_steps=10))[0]
    out = tmp_path / "out"
    run_cli("export", "--base", str(base), "--adapter", str(adapters[0]), "--adapter",
            str(adapters[1]), "-o", str(out), "--trace-cache", str(trace_cache))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["adapters"] == [str(a.resolve()) for a in adapters]
    for backend in ("onnxruntime", "torch"):
        got = PipoSession.load(out, backend=backend).generate(
            [PROMPT], GenerationConfig(max_steps=10)).sequences[0]
        assert got.pairs == want.pairs, backend


def test_run_stack_on_torch_gives_peft_sequential_tokens(stack):
    base, adapters, merged = stack
    want = ReferenceDecoder(merged).generate([PROMPT], GenerateOptions(max_steps=10))[0]
    proc = run_cli("run", "--base", str(base), "--adapter", str(adapters[0]), "--adapter",
                   str(adapters[1]), "--backend", "torch", "--ids", ",".join(map(str, PROMPT)),
                   "--max-steps", "10", "--json")
    assert json.loads(proc.stdout)["pairs"] == want.pairs
