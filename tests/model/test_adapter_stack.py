"""Stacked adapters (the PIPO release: an SFT LoRA over Qwen3.5, then an OPD LoRA trained over
the SFT-merged model, in ms-swift's folder layout) against peft applying the same two adapters
in sequence (merge_and_unload twice). Tolerance: exact (float32, same operations as peft)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipo_export import CheckpointError, load_checkpoint
from pipo_export.cli import main
from pipo_export.model.adapters import open_adapter, write_merged
from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder

from peft_pairs import PROMPT, build_stack, peft_load_merge  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return build_stack(tmp_path_factory.mktemp("stack"))


def assert_equal_state(names, get, model):
    ref = model.state_dict()
    assert set(names) == set(ref) - {"lm_head.weight"}
    for name in names:
        assert torch.equal(get(name).to(ref[name].dtype), ref[name]), name


def test_stack_equals_peft_sequential_merge(stack):
    base, (sft, opd), merged = stack
    _, src = open_adapter([sft, opd], base)
    assert_equal_state(src.names(), src.get, merged)
    assert_equal_state(src.names(), src.get, peft_load_merge([sft, opd]))  # from the folders
    only_sft = open_adapter(sft, base)[1]  # the OPD stage changed the weights
    assert not torch.equal(only_sft.get("model.layers.0.mlp.up_proj.weight"),
                           src.get("model.layers.0.mlp.up_proj.weight"))
    saved = load_file(str(opd / "adapter_model.safetensors"))  # later modules_to_save win
    assert torch.equal(src.get("compressor.mlp.0.weight"),
                       saved["base_model.model.compressor.mlp.0.weight"])


def test_merge_command_stack_and_sequential_merges_agree(stack, tmp_path, capsys):
    """`merge --base B --adapter SFT --adapter OPD` == peft, and == merging SFT to disk, then
    OPD over that folder (bf16 base: the later adapter sees the earlier merge as stored)."""
    base, (sft, opd), merged = stack
    out = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--adapter", str(sft), "--adapter", str(opd),
                 "-o", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    model = load_checkpoint(out)
    assert_equal_state([k for k in model.state_dict() if k != "lm_head.weight"],
                       model.state_dict().__getitem__, merged)
    opts = GenerateOptions(max_steps=6, threshold=-1.0)
    ours = ReferenceDecoder(model).generate([PROMPT], opts)[0]
    assert ours.pairs == ReferenceDecoder(merged.eval()).generate([PROMPT], opts)[0].pairs


def test_bf16_stack_equals_peft_and_two_merges_on_disk(tmp_path):
    """A bf16 release: every merged tensor equals peft's bf16 sequential merge (exact here;
    peft adds a bf16-rounded delta where we round once, so one bf16 rounding is the bound),
    and the stacked merge equals merging SFT to disk, then OPD over that folder."""
    base, (sft, opd), merged = build_stack(tmp_path / "bf16", dtype=torch.bfloat16)
    _, src = open_adapter([sft, opd], base)
    assert_equal_state(src.names(), src.get, merged)
    write_merged(sft, base, tmp_path / "sft-merged")
    write_merged(opd, tmp_path / "sft-merged", tmp_path / "two-step")
    write_merged([sft, opd], base, tmp_path / "stacked")
    a = load_file(str(tmp_path / "two-step" / "model.safetensors"))
    b = load_file(str(tmp_path / "stacked" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for k, v in b.items() if "A_log" not in k} == {torch.bfloat16}


def test_inspect_shows_the_stack(stack, capsys):
    base, (sft, opd), _ = stack
    assert main(["inspect", "--base", str(base), "--adapter", str(sft), "--adapter", str(opd),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapters"] == [str(sft), str(opd)] and report["compressor_type"] == "mlp"
    assert main(["inspect", str(sft), "--base", str(base), "--adapter", str(opd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapters"] == [str(sft), str(opd)]


def test_swift_compressor_type_is_read_and_checked(stack, tmp_path):
    """ms-swift's additional_config.json may carry compressor_type (the PIPO training plugin
    reads it there); it must agree with the saved compressor's keys."""
    base, (sft, opd), _ = stack
    bad = tmp_path / "opd"
    shutil.copytree(opd, bad)
    extra = json.loads((bad / "additional_config.json").read_text())
    (bad / "additional_config.json").write_text(json.dumps(dict(extra, compressor_type="mlp")))
    assert open_adapter([sft, bad], base)[0].compressor_type.value == "mlp"
    (bad / "additional_config.json").write_text(json.dumps(dict(extra, compressor_type="linear")))
    with pytest.raises(CheckpointError, match="compressor_type 'linear' but the weights hold "
                                              "compressor.mlp"):
        open_adapter([sft, bad], base)


def test_stack_refusals(stack, tmp_path):
    base, (sft, opd), _ = stack
    with pytest.raises(CheckpointError, match="--base BASE is required"):
        open_adapter([sft, opd], None)
    with pytest.raises(CheckpointError, match="no adapter given"):
        open_adapter([], base)
    with pytest.raises(CheckpointError, match="is itself an adapter folder"):
        open_adapter([opd], sft)
