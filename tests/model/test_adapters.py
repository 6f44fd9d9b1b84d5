"""PEFT LoRA adapters over a plain Qwen3.5 base: AdapterSource and `merge` against peft's own
merge_and_unload (exact in float32), layouts, dtypes, every refusal, greedy tokens."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipo_export import CheckpointError, PipoError, load_checkpoint
from pipo_export.cli.merge import command as merge_command
from pipo_export.model.adapters import is_adapter_folder, open_adapter, write_merged
from pipo_export.model.config import CompressorType
from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_export.model.synthetic import TINY_TEXT_CONFIG

from peft_pairs import PROJ, PROMPT, SAVED, build  # noqa: E402


def assert_matches_peft(names, get, merged):
    ref = merged.state_dict()
    assert set(names) == set(ref) - {"lm_head.weight"}  # tied: stored once, as the embedding
    for name in names:
        value = get(name)
        assert value.dtype == ref[name].dtype or value.dtype == torch.float32, name
        assert torch.equal(value.to(ref[name].dtype), ref[name]), name


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def merged_out(tmp_path_factory, plain):
    out = tmp_path_factory.mktemp("merged") / "out"
    write_merged(plain[1], plain[0], out)
    return out


VARIANTS = {
    "patterns": dict(rank_pattern={"layers.0.mlp.gate_proj": 6,  # first matching key wins
                                   r"model\.layers\.3\.self_attn\.[qk]_proj": 2, "q_proj": 3},
                     alpha_pattern={"down_proj": 32, "^mtp.layers.0.self_attn.o_proj": 1}),
    "rslora": dict(use_rslora=True, rank_pattern={"v_proj": 9}),
    "embedding-and-linear-attn": dict(target_modules=PROJ + ["embed_tokens", "in_proj_qkv",
                                                             "in_proj_z", "out_proj"]),
    "language-model-keys": dict(language_model_keys=True),
}


def test_source_equals_peft_merge(plain):
    """Every tensor exactly equal (float32: same formula, same float32 operations as peft)."""
    base, adapter, merged = plain
    cfg, src = open_adapter(adapter, base)
    assert (cfg.compressor_type, cfg.pad_token_id, cfg.eos_token_ids, cfg.config_layout) == (
        CompressorType.MLP, 319, [318], "multimodal")
    assert_matches_peft(src.names(), src.get, merged)
    raw = load_file(str(adapter / "adapter_model.safetensors"))
    assert not torch.equal(src.get("mtp.fc.weight"), src.base.get("mtp.fc.weight"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in raw.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_variants_equal_peft_merge(tmp_path, variant):
    base, adapter, merged = build(tmp_path, **VARIANTS[variant])
    _, src = open_adapter(adapter, base)
    assert_matches_peft(src.names(), src.get, merged)
    if variant.startswith("embedding"):  # the tied lm_head follows the merged embedding
        assert torch.equal(merged.lm_head.weight, src.get("model.embed_tokens.weight"))


def test_fan_in_fan_out_is_ignored_like_peft_on_linear(plain, tmp_path):
    """peft forces fan_in_fan_out off for nn.Linear targets, so a config saying true merges the
    same (no transpose)."""
    _, src = open_adapter(_edited(plain, tmp_path, config={"fan_in_fan_out": True}), plain[0])
    assert_matches_peft(src.names(), src.get, plain[2])


def test_merged_folder_loads_and_equals_peft(plain, merged_out):
    base, _, merged = plain
    model = load_checkpoint(merged_out)
    assert_matches_peft([k for k in model.state_dict() if k != "lm_head.weight"],
                        model.state_dict().__getitem__, merged)
    config = json.loads((merged_out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and "text_config" in config
    assert (config["compressor_type"], config["pad_token_id"], config["mtp_num_hidden_layers"]) == (
        "mlp", 319, 1)
    stored = load_file(str(merged_out / "model.safetensors"))
    assert all(k.startswith(("model.language_model.", "mtp.", "compressor.", "confidence_head.",
                             "model.visual.")) for k in stored)
    visual = "model.visual.patch_embed.proj.weight"
    base_tensors = {k: v for f in base.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    base_visual = base_tensors[visual]
    assert stored[visual].dtype == torch.bfloat16 and torch.equal(stored[visual], base_visual)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (merged_out / name).read_bytes() == (base / name).read_bytes()


def test_bf16_base_keeps_dtypes_and_shards(tmp_path):
    base, adapter, merged = build(tmp_path, dtype=torch.bfloat16)
    files = write_merged(adapter, base, tmp_path / "out", shard_bytes=40_000)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    stored = {}
    for name in files:
        stored.update(load_file(str(tmp_path / "out" / name)))
    assert set(index["weight_map"]) == set(stored)
    ref = merged.state_dict()
    for key, value in stored.items():
        if key.startswith("model.visual."):
            continue
        name = key.replace("model.language_model.", "model.")
        assert value.dtype == ref[name].dtype, name  # bf16 stays bf16, A_log stays float32
        assert torch.equal(value, ref[name]), name
    assert stored["model.language_model.layers.0.linear_attn.A_log"].dtype == torch.float32
    f16 = write_merged(adapter, base, tmp_path / "f16", dtype="float16")
    assert {v.dtype for k, v in load_file(str(tmp_path / "f16" / f16[0])).items()
            if not k.startswith("model.visual.")} == {torch.float16}


def test_greedy_tokens_equal_peft_merged_model(plain, merged_out):
    opts = GenerateOptions(max_steps=8, threshold=-1.0)
    ours = ReferenceDecoder(load_checkpoint(merged_out)).generate([PROMPT], opts)[0]
    theirs = ReferenceDecoder(plain[2].eval()).generate([PROMPT], opts)[0]
    assert ours.pairs == theirs.pairs and ours.confidence == theirs.confidence


def test_merge_command_and_pad_sources(plain, tmp_path, capsys):
    base, adapter, _ = plain
    assert is_adapter_folder(adapter) and not is_adapter_folder(base)
    ns = SimpleNamespace(adapter=str(adapter), base=str(base), out=str(tmp_path / "m"), force=False)
    assert merge_command(ns) == 0 and "1 weight file" in capsys.readouterr().out
    with pytest.raises(PipoError, match="already exists; pass --force"):
        merge_command(ns)
    ns.force = True
    assert merge_command(ns) == 0
    own = tmp_path / "adapter"
    shutil.copytree(adapter, own)
    (own / "config.json").write_text(json.dumps({"pad_token_id": 7}))
    assert open_adapter(own, base)[0].pad_token_id == 7  # the adapter's config.json comes first


def _edited(plain, tmp_path, config=None, tensors=None, drop=()):
    """A copy of the plain adapter with config fields / tensors replaced and files dropped."""
    folder = tmp_path / "edited"
    shutil.copytree(plain[1], folder)
    if config:
        raw = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if tensors:
        path = folder / "adapter_model.safetensors"
        save_file({**load_file(str(path)), **tensors}, str(path))
    for name in drop:
        (folder / name).unlink()
    return folder


P = "base_model.model."
DOWN = P + "model.layers.0.mlp.down_proj"
LAYER9 = P + "model.layers.9.mlp.down_proj"  # targeted by the rules, absent from the base
NAN = float("nan")
ERRORS = {  # case: (edits of the plain adapter, expected text of the one-line error)
    "ia3": (dict(config={"peft_type": "IA3"}),
            "IA3 adapters are not supported; pipo-export merges LoRA adapters"),
    "dora": (dict(config={"use_dora": True}), "DoRA (use_dora) adapters are not supported"),
    "pissa": (dict(config={"init_lora_weights": "pissa"}),
              "init_lora_weights='pissa' changed the base weights"),
    "layer-replication": (dict(config={"layer_replication": [[0, 2]]}),
                          "layer_replication adapters are not supported"),
    "rank-mismatch": (dict(config={"r": 8}), "gives r=8; the config does not belong"),
    "shape-lora": (dict(tensors={DOWN + ".lora_A.weight": torch.zeros(4, 80)}),
                   "LoRA on model.layers.0.mlp.down_proj is (64, 80) (lora_A (4, 80), lora_B "
                   "(64, 4)) but the base's model.layers.0.mlp.down_proj.weight is (64, 96)"),
    "shape-saved": (dict(tensors={P + "mtp.fc.weight": torch.zeros(64, 100)}),
                    "modules_to_save tensor mtp.fc.weight has shape (64, 100) but the base's "
                    "is (64, 128)"),
    "no-such-module": (dict(tensors={LAYER9 + ".lora_A.weight": torch.zeros(4, 96),
                                     LAYER9 + ".lora_B.weight": torch.zeros(64, 4)}),
                       "LoRA on model.layers.9.mlp.down_proj but the base has no "
                       "model.layers.9.mlp.down_proj.weight"),
    "visual": (dict(tensors={P + "model.visual.blocks.0.attn.q_proj.lora_A.weight":
                             torch.ones(4, 8)}), "is in the vision tower"),
    "bin-only": (dict(drop=["adapter_model.safetensors"]),
                 "adapter_model.bin must be converted to adapter_model.safetensors"),
    "no-config": (dict(drop=["adapter_config.json"]), "no adapter_config.json"),
    "nan-lora": (dict(tensors={DOWN + ".lora_A.weight": torch.full((4, 96), NAN)}),
                 "tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight holds NaN"),
    "inf-saved": (dict(tensors={P + "mtp.fc.weight": torch.full((64, 128), float("inf"))}),
                  "tensor base_model.model.mtp.fc.weight holds NaN or Inf"),
    "lora_alpha-nan": (dict(config={"lora_alpha": NAN}), "lora_alpha is nan"),
    "alpha_pattern-inf": (dict(config={"alpha_pattern": {"down_proj": float("inf")}}),
                          "alpha_pattern['down_proj'] is inf"),
    "alpha_pattern-nan": (dict(config={"alpha_pattern": {"down_proj": NAN}}),
                          "alpha_pattern['down_proj'] is nan"),
    "rank_pattern-0": (dict(config={"rank_pattern": {"q_proj": 0}}),
                       "rank_pattern['q_proj'] is 0; expected a positive integer"),
    "rank_pattern-text": (dict(config={"rank_pattern": {"q_proj": "4"}}),
                          "rank_pattern['q_proj'] is '4'"),
    "rank_pattern-regex": (dict(config={"rank_pattern": {"(q": 4}}),
                           "rank_pattern key '(q' is not a valid regular expression"),
    "tied-lm-head": (dict(tensors={P + "lm_head.weight": torch.zeros(320, 64)}),
                     "the adapter saves lm_head.weight but the base ties it to embed_tokens"),
    "no-target": (dict(config={"target_modules": ["nope_proj"]}),
                  "peft refuses this adapter: no modules were targeted"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_refusals_name_the_problem(plain, tmp_path, case):
    edits, message = ERRORS[case]
    folder = _edited(plain, tmp_path, **edits)
    if case == "bin-only":
        (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError) as err:
        open_adapter(folder, plain[0])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_base_and_pad(plain, tmp_path):
    base, adapter, _ = plain
    with pytest.raises(CheckpointError, match="--base BASE is required for an adapter folder"):
        write_merged(adapter, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(CheckpointError, match="base folder .*nope not found"):
        open_adapter(adapter, tmp_path / "nope")
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    (bare / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r'write \{"pad_token_id": ID\} to .*248044'):
        open_adapter(adapter, bare)
    with pytest.raises(CheckpointError, match="is itself an adapter folder"):
        open_adapter(adapter, adapter)
