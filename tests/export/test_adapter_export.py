"""A peft-written adapter + released-style base, exported with --base: the export's greedy tokens
equal those of peft's merge_and_unload model (torch reference), exactly."""
from __future__ import annotations

import json

import pytest

from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_runtime import GenerationConfig, PipoSession

from conftest import export_folder, run_cli
from peft_pairs import PROMPT, build


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
