"""peft's rules for which adapter keys apply, compared with peft itself: the saved adapter's
config edited (target_modules as a list or a regex, layers_to_transform + layers_pattern,
exclude_modules) or extra keys added, then our merge vs PeftModel.from_pretrained +
merge_and_unload of the same folder. Tolerance: exact (float32, same operations)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipo_export import CheckpointError
from pipo_export.model.adapters import open_adapter

from peft_pairs import build, peft_load_merge  # noqa: E402


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build(tmp_path_factory.mktemp("rules"))


def _copy(plain, tmp_path, config=None, tensors=None):
    folder = tmp_path / "adapter"
    shutil.copytree(plain[1], folder)
    if config:
        raw = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if tensors:
        path = folder / "adapter_model.safetensors"
        save_file({**load_file(str(path)), **tensors}, str(path))
    return folder


P = "base_model.model."
RULES = {
    "layers_to_transform list": dict(layers_to_transform=[0, 2]),
    "layers_to_transform int + layers_pattern": dict(layers_to_transform=3,
                                                     layers_pattern="layers"),
    "exclude_modules list": dict(exclude_modules=["down_proj", "q_proj"]),
    "exclude_modules regex": dict(exclude_modules=r"mtp\..*"),
    "target_modules regex": dict(target_modules=r".*\.mlp\.(gate|up)_proj"),
    "target_modules subset": dict(target_modules=["k_proj", "gate_proj"]),
    "target_modules exact name": dict(target_modules=["model.layers.1.mlp.up_proj"]),
}


@pytest.mark.parametrize("rule", RULES)
def test_rules_select_the_keys_peft_selects(plain, tmp_path, rule):
    folder = _copy(plain, tmp_path, config=RULES[rule])
    ref = peft_load_merge([folder]).state_dict()
    _, src = open_adapter(folder, plain[0])
    assert src.ignored  # the rule left some saved factors out
    assert set(src.names()) == set(ref) - {"lm_head.weight"}
    for name in src.names():
        assert torch.equal(src.get(name).to(ref[name].dtype), ref[name]), name


def test_keys_peft_ignores_or_loads(plain, tmp_path):
    """An untargeted module's factors, a magnitude vector and a target's own weight are
    unexpected keys to peft (ignored); a plain parameter outside every target is loaded."""
    extra = P + "model.layers.0.mlp.extra"
    folder = _copy(plain, tmp_path, tensors={
        extra + ".lora_A.weight": torch.ones(4, 64), extra + ".lora_B.weight": torch.ones(64, 4),
        P + "model.layers.0.mlp.down_proj.lora_magnitude_vector": torch.ones(64),
        P + "model.layers.1.mlp.down_proj.weight": torch.full((64, 96), 3.0),
        P + "model.norm.weight": torch.full((64,), 7.0)})
    ref = peft_load_merge([folder]).state_dict()
    _, src = open_adapter(folder, plain[0])
    assert len(src.ignored) == 4
    assert torch.equal(src.get("model.norm.weight"), ref["model.norm.weight"])
    for name in src.names():
        assert torch.equal(src.get(name).to(ref[name].dtype), ref[name]), name


@pytest.mark.parametrize("config", [dict(target_modules=["nope_proj"]),
                                    dict(target_modules=["q_proj"], exclude_modules=["q_proj"])])
def test_rules_selecting_nothing_are_refused_like_peft(plain, tmp_path, config):
    folder = _copy(plain, tmp_path, config=config)
    with pytest.raises(ValueError):  # peft's NoMatchingPeftModuleError
        peft_load_merge([folder])
    with pytest.raises(CheckpointError, match="peft refuses this adapter") as err:
        open_adapter(folder, plain[0])
    assert "\n" not in str(err.value)
