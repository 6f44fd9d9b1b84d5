"""Test helper: a peft-written LoRA adapter over a released-style Qwen3.5 base (tiny shape), and
peft's own merge_and_unload of it (the reference every adapter test compares with)."""
from __future__ import annotations

import json
import warnings

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from pipo_export.model.synthetic import TINY_TEXT_CONFIG, random_model, write_tiny_tokenizer

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAVED = ["compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_embedding",
         "mtp.pre_fc_norm_hidden", "mtp.norm", "mtp.layers.0.input_layernorm",
         "mtp.layers.0.post_attention_layernorm", "mtp.layers.0.self_attn.q_norm",
         "mtp.layers.0.self_attn.k_norm"]
PIPO_ONLY = ("compressor.", "confidence_head.")
PROMPT = [5, 17, 300, 2, 9, 44, 12]


def write_base(folder, model, shards: int = 2):
    """A released-Qwen3.5-style folder from `model`: multimodal wrapper config without PIPO
    fields, model.language_model.* + mtp.* + a visual tensor (no compressor or confidence
    head), Qwen's shard names, tokenizer.json + tokenizer_config.json with pad_token."""
    folder.mkdir(parents=True)
    state = {("model.language_model." + k[6:] if k.startswith("model.") else k): v.detach().clone()
             for k, v in model.state_dict().items()
             if not k.startswith(PIPO_ONLY) and k != "lm_head.weight"}
    state["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 4, 4).to(torch.bfloat16)
    text = {k: v for k, v in TINY_TEXT_CONFIG.items()
            if k not in ("compressor_type", "pad_token_id")}
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "text_config": text, "vision_config": {"depth": 1}, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model.safetensors-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in keys[i::shards]}, str(folder / name))
        weight_map.update({k: name for k in keys[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_tiny_tokenizer(folder, 320, 318, 319)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>",
                                                             "eos_token": "<|eos|>"}))
    return folder


def build(root, dtype=None, language_model_keys=False, **lora):
    """(base folder, adapter folder, peft's merge_and_unload model) for one LoRA config."""
    model = random_model(TINY_TEXT_CONFIG, seed=1)
    if dtype is not None:  # like the release: bf16, A_log and the gated norm float32
        model.to(dtype)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "linear_attn.norm.weight")):
                p.data = p.data.float()
    base = write_base(root / "base", model)
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(**{
        "r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": PROJ,
        "modules_to_save": SAVED, **lora}))
    with torch.no_grad():  # trained copies differ from the base
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape).to(p.dtype) * 0.05)
    adapter = root / "adapter"
    with warnings.catch_warnings():  # peft cannot find embedding layers on a non-HF model
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(adapter))
    if language_model_keys:  # an adapter trained on the wrapper's module names
        path = adapter / "adapter_model.safetensors"
        save_file({k.replace("base_model.model.model.", "base_model.model.model.language_model."): v
                   for k, v in load_file(str(path)).items()}, str(path))
    return base, adapter, peft_model.merge_and_unload()


# target_modules as ms-swift writes a regex (swift get_multimodal_target_regex:
# rf'^({"|".join(rf"{re.escape(module)}(?=\.).*\.({leaves})" for module in towers)})$'),
# here over the PIPO model's two towers of projections; peft matches it with re.fullmatch
_LEAVES = "|".join(sorted(PROJ))
OPD_TARGETS = rf"^(model(?=\.).*\.({_LEAVES})|mtp(?=\.).*\.({_LEAVES}))$"


def write_swift_files(adapter, base_name: str = "Qwen/Qwen3.5-4B") -> None:
    """The files ms-swift writes beside peft's two in a LoRA checkpoint folder:
    - additional_config.json: swift/tuners/peft.py LoraConfig.save_pretrained dumps its fields
      peft lacks, {"lora_dtype", "lorap_lr_ratio", "lorap_emb_lr"};
    - args.json: the TrainArguments of the run (a subset here: the fields a LoRA run sets);
    - configuration.json: ModelScope's model card stub {"framework", "task", "allow_remote"}.
    adapter_config.json and adapter_model.safetensors are peft's save_pretrained output
    (ms-swift calls it, after dropping its own fields), keys base_model.model.<module>...."""
    (adapter / "additional_config.json").write_text(json.dumps(
        {"lora_dtype": None, "lorap_lr_ratio": None, "lorap_emb_lr": 1e-06}))
    (adapter / "args.json").write_text(json.dumps(
        {"model": base_name, "model_type": "qwen3_5_mtp", "train_type": "lora",
         "rlhf_type": "gkd", "lora_rank": 8, "lora_alpha": 16, "target_modules": ["all-linear"],
         "modules_to_save": SAVED, "torch_dtype": "bfloat16", "adapters": [],
         "output_dir": "output/v0-20260101-000000"}, indent=2))
    (adapter / "configuration.json").write_text(json.dumps(
        {"framework": "pytorch", "task": "text-generation", "allow_remote": True}))


def _train(model, folder, seed: int, **lora):
    """get_peft_model with random factors and modules_to_save copies moved off the base, saved
    to `folder`; -> peft's merge_and_unload model."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{
        "r": 8, "lora_alpha": 16, "init_lora_weights": False, "target_modules": PROJ,
        "modules_to_save": SAVED, **lora}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape).to(p.dtype) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder))
    return peft_model.merge_and_unload()


def build_stack(root, dtype=None):
    """A two-stage release like the PIPO authors': (base, [sft, opd], peft's sequential merge).
    The SFT adapter is trained over the base; the OPD adapter (ms-swift folder layout, regex
    target_modules) over the SFT-merged model; the reference is merge_and_unload twice."""
    model = random_model(TINY_TEXT_CONFIG, seed=1)
    if dtype is not None:
        model.to(dtype)
    base = write_base(root / "base", model)
    sft, opd = root / "sft", root / "opd"
    model = _train(model, sft, 2)
    merged = _train(model, opd, 3, target_modules=OPD_TARGETS)
    write_swift_files(opd)
    return base, [sft, opd], merged


def peft_load_merge(adapters, dtype=None):
    """peft's own reading of saved folders: PeftModel.from_pretrained over a fresh copy of the
    base model, then merge_and_unload, once per adapter in order."""
    from peft import PeftModel
    model = random_model(TINY_TEXT_CONFIG, seed=1)
    if dtype is not None:
        model.to(dtype)
    for folder in adapters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model
