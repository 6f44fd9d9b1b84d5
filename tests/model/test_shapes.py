"""Real Qwen3.5 shapes (0.8B / 4B / 9B): published configs, released-layout random checkpoints
written tensor by tensor (depth-cut here; the full shapes are benchmark material), and the
PEFT adapter + plain base pair."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from pipo_export.model.adapters import open_adapter
from pipo_export.model.checkpoint import open_checkpoint
from pipo_export.model.config import CompressorType, parse_config
from pipo_export.model.shapes import (INDEX_FILE, SHAPES, RandomTensors, checkpoint_config,
                                      parameter_counts, pipo_text_config, tensor_plan,
                                      write_adapter_stack,
                                      write_shape_checkpoint)

SHAPE = "qwen3.5-0.8b"
LINEAR_NORM = "model.language_model.layers.0.linear_attn.norm.weight"
IN_PROJ_B = "model.language_model.layers.0.linear_attn.in_proj_b.weight"
# (hidden, layers, linear value heads, tied, published config.json bytes or None,
#  base parameters: 0.8B/4B from the published file sizes, 9B exactly as Hugging Face reports)
PUBLISHED = {"qwen3.5-0.8b": (1024, 24, 16, True, 2907, 873_438_784),
             "qwen3.5-4b": (2560, 32, 32, True, 3161, 4_659_865_088),
             "qwen3.5-9b": (4096, 32, 32, False, None, 9_653_104_368)}


def stored(folder) -> dict[str, tuple[str, list[int], str]]:
    """key -> (safetensors dtype, shape, file) over every weight file of `folder`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), sl.get_shape(), path.name)
    return out


def tensor(folder, key) -> torch.Tensor:
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    with safe_open(str(folder / weight_map[key]), "pt") as f:
        return f.get_tensor(key)


@pytest.fixture(scope="module")
def pipo_ckpt(tmp_path_factory):
    """0.8B-shaped, 4 layers, with the vision tower, in 300 MiB shards (3 files)."""
    root = tmp_path_factory.mktemp("shape")
    yield write_shape_checkpoint(root / "ck", SHAPE, layers=4, shard_bytes=300 * 2**20)
    shutil.rmtree(root)  # ~0.9 GB: not kept among pytest's last three temp dirs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base, adapter, adapter-2): a plain 0.8B-shaped base (4 layers, no vision tower, one
    shard) and two stacked LoRA adapters with r 8, alpha 32 (write_adapter_stack)."""
    root = tmp_path_factory.mktemp("pair")
    base, adapters = write_adapter_stack(root, SHAPE, layers=4, r=8, alpha=32,
                                         include_visual=False)
    yield base, *adapters
    shutil.rmtree(root)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parse(name):
    hidden, layers, v_heads, tied, size, params = PUBLISHED[name]
    cfg = parse_config(checkpoint_config(name))
    text = cfg.text
    assert (text.hidden_size, text.num_hidden_layers, text.linear_num_value_heads,
            bool(text.tie_word_embeddings), text.vocab_size) == (hidden, layers, v_heads, tied,
                                                                  248320)
    assert text.layer_types == ["linear_attention", "linear_attention", "linear_attention",
                                "full_attention"] * (layers // 4)
    assert text.rope_parameters["rope_theta"] == 1e7
    assert text.rope_parameters["mrope_section"] == [11, 11, 10]
    assert (cfg.compressor_type, cfg.pad_token_id, cfg.eos_token_ids, cfg.config_layout) == (
        CompressorType.MLP, 248044, [248044, 248046], "multimodal")
    flat = parse_config(pipo_text_config(name, layers=6))
    assert flat.text.num_hidden_layers == 6 and flat.eos_token_ids == [248044, 248046]
    plain = checkpoint_config(name, pipo=False)
    assert "pad_token_id" not in plain and plain["text_config"]["eos_token_id"] == 248044
    if size:  # the published key set and order: byte-identical size
        assert len(json.dumps(plain, indent=4)) == size
    assert parameter_counts(name)["base_total"] == params


def test_depth_cut_checkpoint_opens(pipo_ckpt):
    cfg, source, layout = open_checkpoint(pipo_ckpt)
    assert cfg.text.num_hidden_layers == 4 and cfg.text.layer_types[3] == "full_attention"
    assert layout.key_prefix == "model.language_model." and layout.config_layout == "multimodal"
    assert len(layout.ignored_keys) == 153  # the whole 0.8B vision tower
    keys = stored(pipo_ckpt)
    assert "model.visual.merger.linear_fc2.weight" in keys
    assert keys["model.visual.patch_embed.proj.weight"][1] == [768, 3, 2, 16, 16]
    assert sum(k.startswith("mtp.") for k in keys) == 15
    assert "lm_head.weight" not in keys  # tied


def test_dtypes_as_released(pipo_ckpt):
    for key, (dtype, _, _) in stored(pipo_ckpt).items():
        f32 = key.endswith(("linear_attn.A_log", "linear_attn.norm.weight"))
        assert dtype == ("F32" if f32 else "BF16"), key


def test_index(pipo_ckpt, pair):
    index = json.loads((pipo_ckpt / INDEX_FILE).read_text())
    keys = stored(pipo_ckpt)
    assert index["weight_map"] == {k: v[2] for k, v in keys.items()}
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(len(files))]
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in tensor_plan(SHAPE, 4))
    base_index = json.loads((pair[0] / INDEX_FILE).read_text())  # one shard: still an index
    assert set(base_index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_deterministic_and_order_independent(pipo_ckpt, pair):
    """Values depend on (seed, key) only: not on shards, order, PIPO modules or vision."""
    base = pair[0]
    for key in (IN_PROJ_B, LINEAR_NORM, "mtp.fc.weight", "model.language_model.norm.weight"):
        a, b = tensor(pipo_ckpt, key), tensor(base, key)
        assert a.dtype == b.dtype and a.view(-1).view(torch.uint8).equal(
            b.view(-1).view(torch.uint8)), key
    fresh = RandomTensors(0).make(IN_PROJ_B, (16, 1024), torch.bfloat16)
    assert torch.equal(fresh, tensor(pipo_ckpt, IN_PROJ_B))
    assert not torch.equal(RandomTensors(1).make(IN_PROJ_B, (16, 1024), torch.bfloat16), fresh)


def test_scales(pipo_ckpt):
    norm = tensor(pipo_ckpt, LINEAR_NORM)  # w * x form: near 1
    assert abs(norm.mean().item() - 1) < 0.05 and norm.dtype == torch.float32
    a_log = tensor(pipo_ckpt, "model.language_model.layers.0.linear_attn.A_log")
    assert 0 <= a_log.min() and a_log.max() <= 1.5
    up = tensor(pipo_ckpt, "model.language_model.layers.0.mlp.up_proj.weight").float()
    assert abs(up.std().item() * 1024**0.5 - 1) < 0.05


def test_adapter_stack_opens(pair):
    """The second adapter merges over the first merge as stored (bf16), scaling 32 / 8."""
    base, first, second = pair
    _, source = open_adapter([first, second], base)
    open_checkpoint(None, base, [first, second])
    with safe_open(str(first / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(second / "adapter_model.safetensors"), "pt") as g:
        module = "model.language_model.layers.1.mlp.down_proj"
        one, two = ((h.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
                     @ h.get_tensor(f"base_model.model.{module}.lora_A.weight").float()) * 4.0
                    for h in (f, g))
        assert not torch.equal(one, two)
    stage1 = (tensor(base, module + ".weight").float() + one).to(torch.bfloat16)
    assert torch.equal(source.get(module.replace("language_model.", "") + ".weight"),
                       stage1.float() + two)


def test_adapter_pair_opens(pair):
    base, adapter, _ = pair
    assert "compressor.mlp.0.weight" not in {k for k in stored(base)}
    cfg, source = open_adapter(adapter, base)
    assert (cfg.compressor_type, cfg.pad_token_id) == (CompressorType.MLP, 248044)
    open_checkpoint(adapter, base)  # names and shapes of the merged model
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        factors = {k: f.get_tensor(k) for k in f.keys()}
    for module in ("model.language_model.layers.3.self_attn.q_proj",
                   "model.language_model.layers.1.mlp.down_proj", "mtp.layers.0.mlp.gate_proj"):
        a = factors[f"base_model.model.{module}.lora_A.weight"]
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 8
        merged = source.get(module.replace("language_model.", "") + ".weight")
        expected = tensor(base, module + ".weight").float() + (b.float() @ a.float()) * 4.0
        assert torch.equal(merged, expected), module  # scaling = alpha / r = 32 / 8
    assert torch.equal(source.get("mtp.fc.weight"), factors["base_model.model.mtp.fc.weight"])
