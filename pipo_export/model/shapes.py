"""Random-weight checkpoints with the real dims of Qwen3.5-0.8B, -4B and -9B, in the released
layout, written tensor by tensor (for tests and benchmarks; the weights mean nothing).

Layout (as Qwen's release): config.json is the multimodal wrapper (``qwen3_5`` + text_config +
vision_config); bf16 safetensors shards + model.safetensors.index.json; keys
``model.language_model.*`` (backbone), ``lm_head.weight`` (untied 9B only), Qwen's 15 ``mtp.*``
tensors, ``model.visual.*`` (vision tower); ``linear_attn.A_log`` and ``linear_attn.norm.weight``
float32, everything else bf16. A PIPO checkpoint (pipo=True) adds ``compressor.mlp.{0,2}.*`` and
``confidence_head.*`` and the PIPO fields at the top of config.json.

Every tensor has its own generator seeded from (seed, key): values do not depend on the order of
writing, on `layers` or on the shard size. Scales follow synthetic.random_model: A_log
uniform(0, 1.5); 1-D weights N(0, 0.1^2) (Qwen3_5RMSNorm computes x*(1+w)); w*x norms
(linear_attn.norm, the vision LayerNorms) N(1, 0.1^2); weights [out, in, ...] N(0, 1/fan_in).
Memory while writing: one shard (`shard_bytes`) plus a 64 MB float32 buffer.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipo_export.errors import PipoError
from pipo_export.model.checkpoint import expected_shapes, skeleton
from pipo_export.model.config import CompressorType, parse_config
from pipo_export.model.source import DEFAULT_SHARD_BYTES, INDEX_FILE

CHUNK = 1 << 24  # float32 elements generated per step (64 MB)
FLOAT32_SUFFIXES = ("linear_attn.A_log", "linear_attn.norm.weight")  # stored F32 in the release
ENDOFTEXT, IM_START, IM_END = 248044, 248045, 248046  # Qwen3.5 tokenizer ids
# docs/contract.md: pad with <|endoftext|>; stop on <|endoftext|> and <|im_end|>; one MTP layer.
PIPO_FIELDS = {"compressor_type": "mlp", "mtp_num_hidden_layers": 1, "pad_token_id": ENDOFTEXT,
               "eos_token_id": [ENDOFTEXT, IM_END]}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAVED_MODULES = ["compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_embedding",
                 "mtp.pre_fc_norm_hidden", "mtp.norm", "mtp.layers.0.input_layernorm",
                 "mtp.layers.0.post_attention_layernorm", "mtp.layers.0.self_attn.q_norm",
                 "mtp.layers.0.self_attn.k_norm"]


def _text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
          linear_v_heads: int, tied: bool) -> dict:
    """A Qwen3.5 text_config with the published key set and order (of the 0.8B file)."""
    return {
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True,
        "dtype": "bfloat16", "eos_token_id": ENDOFTEXT, "full_attention_interval": 4,
        "head_dim": 256, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_types": ["linear_attention" if (i + 1) % 4 else "full_attention"
                        for i in range(layers)],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": linear_v_heads, "linear_value_head_dim": 128,
        "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": tied, "use_cache": True,
        "vocab_size": 248320, "mamba_ssm_dtype": "float32",
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                            "rope_type": "default", "rope_theta": 10000000,
                            "partial_rotary_factor": 0.25},
    }


def _vision(depth: int, hidden: int, intermediate: int, heads: int, out_hidden: int) -> dict:
    return {"deepstack_visual_indexes": [], "depth": depth, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": hidden, "in_channels": 3, "initializer_range": 0.02,
            "intermediate_size": intermediate, "model_type": "qwen3_5", "num_heads": heads,
            "num_position_embeddings": 2304, "out_hidden_size": out_hidden, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2}


@dataclass(frozen=True)
class Shape:
    """A published Qwen3.5 model: its Hugging Face repo, revision and config dicts."""

    name: str
    repo: str
    revision: str
    text_config: dict
    vision_config: dict


SHAPES = {s.name: s for s in (
    # Qwen/Qwen3.5-0.8B config.json @ 2fc06364715b967f1860aea9cf38778875588b17, read verbatim
    # (a `curl .../Qwen3.5-0.8B/resolve/main/config.json` printout: search index id 54505217749;
    # tree listing, config 2907 B, one shard: id 54545947136). Tied, 16 linear value heads.
    Shape("qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B", "2fc06364715b967f1860aea9cf38778875588b17",
          _text(1024, 3584, 24, 8, 2, 16, tied=True), _vision(12, 768, 3072, 12, 1024)),
    # Qwen/Qwen3.5-4B config.json @ 851bf6e806efd8d0a36b00ddf55e13ccb7b8cd0a: values quoted from
    # the fetched file (search index id 65797457517) and a full 4B-shaped config incl.
    # vision_config (id 55173656222); this key set with these values serializes to exactly the
    # published 3161 B; shard sizes (id 69032294126) fit tied embeddings + MTP + vision exactly.
    Shape("qwen3.5-4b", "Qwen/Qwen3.5-4B", "851bf6e806efd8d0a36b00ddf55e13ccb7b8cd0a",
          _text(2560, 9216, 32, 16, 4, 32, tied=True), _vision(24, 1024, 4096, 16, 2560)),
    # Qwen/Qwen3.5-9B config.json @ c202236235762e1c871ad0ccb60c8ee5ba337b9a: first 50 lines
    # (search index id 54688007458), HF API record (github jm-vis/modelroom
    # tests/fixtures/hf_qwen_qwen35_9b_model.json: 9,653,104,368 params = BF16 9,653,100,528 +
    # F32 3,840, matched exactly by these dims, untied), vision from a derived copy (id
    # 57938394977). The published file is 38 B shorter than this key set: one text_config key
    # (probably tie_word_embeddings or mamba_ssm_dtype) is absent there; no dim is affected.
    Shape("qwen3.5-9b", "Qwen/Qwen3.5-9B", "c202236235762e1c871ad0ccb60c8ee5ba337b9a",
          _text(4096, 12288, 32, 16, 4, 32, tied=False), _vision(27, 1152, 4304, 16, 4096)),
)}


def _shape(shape: str | Shape) -> Shape:
    if isinstance(shape, Shape):
        return shape
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return SHAPES[shape]


def _cut(text: dict, layers: int | None) -> dict:
    """text_config cut to its first `layers` layers (the layer pattern kept)."""
    text = copy.deepcopy(text)
    if layers is not None:
        if not 1 <= layers <= text["num_hidden_layers"]:
            raise PipoError(f"--layers must be in [1, {text['num_hidden_layers']}], got {layers}")
        text.update(num_hidden_layers=layers, layer_types=text["layer_types"][:layers])
    return text


def pipo_text_config(shape: str | Shape, layers: int | None = None) -> dict:
    """The flat ``qwen3_5_text`` config of a PIPO model of this shape: the published
    text_config plus PIPO_FIELDS (what synthetic.random_model / write_tiny_checkpoint take)."""
    return {**_cut(_shape(shape).text_config, layers), **copy.deepcopy(PIPO_FIELDS)}


def checkpoint_config(shape: str | Shape, layers: int | None = None, pipo: bool = True) -> dict:
    """config.json: the published wrapper; with pipo, PIPO_FIELDS at the top level and the
    text_config copies of those keys set to the same values (as `merge` writes them)."""
    s = _shape(shape)
    text = _cut(s.text_config, layers)
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "image_token_id": 248056,
              "model_type": "qwen3_5", "text_config": text,
              "tie_word_embeddings": text["tie_word_embeddings"],
              "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
              "vision_config": dict(s.vision_config), "vision_end_token_id": 248054,
              "vision_start_token_id": 248053}  # the published key order
    if pipo:
        config.update(copy.deepcopy(PIPO_FIELDS))
        text.update({k: copy.deepcopy(v) for k, v in PIPO_FIELDS.items() if k in text})
    return config


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: key as written, shape, torch dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _stored_key(name: str) -> str:
    """PipoModel name -> released key (model.X -> model.language_model.X)."""
    return "model.language_model." + name[6:] if name.startswith("model.") else name


def _dtype_of(key: str) -> torch.dtype:
    return torch.float32 if key.endswith(FLOAT32_SUFFIXES) else torch.bfloat16


def text_shapes(shape: str | Shape, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """PipoModel parameter name -> shape, as open_checkpoint expects them (tied lm_head
    omitted), from the meta-device skeleton of the PIPO model."""
    cfg = parse_config(pipo_text_config(shape, layers))
    cfg.compressor_type = CompressorType.MLP
    return expected_shapes(skeleton(cfg))


def vision_shapes(shape: str | Shape) -> dict[str, tuple[int, ...]]:
    """Stored key (model.visual.*) -> shape of the vision tower, from transformers' own module
    on the meta device."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
    vc = {k: v for k, v in _shape(shape).vision_config.items() if k != "model_type"}
    with torch.device("meta"):
        tower = Qwen3_5VisionModel(Qwen3_5VisionConfig(**vc))
    return {"model.visual." + n: tuple(p.shape) for n, p in tower.named_parameters()}


def tensor_plan(shape: str | Shape, layers: int | None = None, pipo: bool = True,
                include_visual: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in writing order: PipoModel's parameter order (backbone,
    compressor, mtp, confidence head, lm_head when untied; PIPO modules only with pipo), then
    the vision tower."""
    specs = [TensorSpec(_stored_key(n), s, _dtype_of(n)) for n, s in
             text_shapes(shape, layers).items()
             if pipo or not n.startswith(("compressor.", "confidence_head."))]
    if include_visual:
        specs += [TensorSpec(k, s, torch.bfloat16) for k, s in vision_shapes(shape).items()]
    return specs


def _seed_of(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_of(key: str, shape: tuple[int, ...]) -> tuple[str, float, float]:
    """How `key` is drawn: ("uniform", low, high) or ("normal", mean, std)."""
    if key.endswith("A_log"):
        return "uniform", 0.0, 1.5
    if key.endswith("linear_attn.norm.weight") or (
            key.startswith("model.visual.") and ".norm" in key and key.endswith(".weight")):
        return "normal", 1.0, 0.1  # w * x norms
    if len(shape) == 1:
        return "normal", 0.0, 0.1
    return "normal", 0.0, math.prod(shape[1:]) ** -0.5


class RandomTensors:
    """Seeded random tensors, each from its own generator, drawn in float32 CHUNK elements at a
    time into one reused buffer and cast into the stored dtype."""

    def __init__(self, seed: int):
        self.seed = seed
        self._buf = torch.empty(CHUNK)

    def make(self, key: str, shape: tuple[int, ...], dtype: torch.dtype,
             init: tuple[str, float, float] | None = None) -> torch.Tensor:
        """A tensor of `shape` and `dtype`; its values depend only on (seed, key, init)."""
        kind, a, b = init or init_of(key, shape)
        gen = torch.Generator().manual_seed(_seed_of(self.seed, key))
        out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            buf = self._buf[:min(CHUNK, flat.numel() - start)]
            if kind == "uniform":
                buf.uniform_(a, b, generator=gen)
            else:
                buf.normal_(a, b, generator=gen)
            flat[start:start + buf.numel()].copy_(buf)
        return out


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups: a new shard starts when the next tensor would pass shard_bytes."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_specs(folder: Path, specs: list[TensorSpec], tensors: RandomTensors,
                shard_bytes: int) -> list[str]:
    """Shards ``model-0000i-of-0000N.safetensors`` + index; one shard in memory at a time."""
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, fname in zip(shards, names):
        state = {s.key: tensors.make(s.key, s.shape, s.dtype) for s in shard}
        save_file(state, str(folder / fname), metadata={"format": "pt"})
        del state
    weight_map = {s.key: fname for shard, fname in zip(shards, names) for s in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_shape_checkpoint(folder: str | Path, shape: str | Shape, *, layers: int | None = None,
                           seed: int = 0, pipo: bool = True, include_visual: bool = True,
                           shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random checkpoint of a published shape (SHAPES) into `folder`; -> folder.

    layers: keep the first N text layers (pattern kept; MTP and vision unchanged).
    pipo: a PIPO checkpoint (compressor, confidence head, PIPO config fields); False writes a
    plain Qwen3.5 base as released. include_visual: the vision tower (ignored by pipo-export).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = checkpoint_config(shape, layers, pipo)
    (folder / "config.json").write_text(json.dumps(config, indent=4))  # as published
    write_specs(folder, tensor_plan(shape, layers, pipo, include_visual), RandomTensors(seed),
                shard_bytes)
    return folder


def write_tokenizer_stub(folder: str | Path) -> None:
    """tokenizer_config.json (pad <|endoftext|>, eos <|im_end|>, as Qwen3.5's) and a loadable
    tokenizer.json that knows only the three chat specials at their real ids (any text encodes
    to <|endoftext|>; other ids decode to nothing)."""
    folder = Path(folder)
    specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for c, i in specials.items()]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": specials, "unk_token": "<|endoftext|>"}}
    (folder / "tokenizer.json").write_text(json.dumps(tok, indent=2) + "\n")
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "model_max_length": 262144,
              "added_tokens_decoder": {str(i): {k: v for k, v in a.items() if k != "id"}
                                       for i, a in zip(specials.values(), added)}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def adapter_tensors(shape: str | Shape, layers: int | None, tensors: RandomTensors,
                    r: int, alpha: float) -> dict[str, torch.Tensor]:
    """The bf16 tensors of a PEFT LoRA adapter over the plain base, keyed as peft saves them:
    ``base_model.model.<module>.lora_A.weight`` [r, in] ~ N(0, 1/in) and ``.lora_B.weight``
    [out, r] ~ N(0, (0.1 / (scaling sqrt(r)))^2) (the merged delta ~ 10 % of the weight) for
    LORA_TARGETS in the backbone and mtp.layers.0; ``base_model.model.<param>`` for the
    parameters of SAVED_MODULES (PIPO init scales). Module paths use the base's key layout."""
    out = {}
    b_std = 0.1 / (alpha / r * math.sqrt(r))
    for name, (rows, *rest) in text_shapes(shape, layers).items():
        module, _, leaf = name.rpartition(".")
        key = "base_model.model." + _stored_key(name)
        if (module.rpartition(".")[2] in LORA_TARGETS and leaf == "weight"
                and name.startswith(("model.layers.", "mtp.layers.0."))):
            prefix = "base_model.model." + _stored_key(module)
            out[prefix + ".lora_A.weight"] = tensors.make(
                prefix + ".lora_A.weight", (r, *rest), torch.bfloat16)
            out[prefix + ".lora_B.weight"] = tensors.make(
                prefix + ".lora_B.weight", (rows, r), torch.bfloat16, ("normal", 0.0, b_std))
        elif any(module == m or module.startswith(m + ".") for m in SAVED_MODULES):
            out[key] = tensors.make(key, (rows, *rest), torch.bfloat16)
    return out


def write_adapter_pair(folder: str | Path, shape: str | Shape, *, layers: int | None = None,
                       seed: int = 0, r: int = 16, alpha: int = 32,
                       include_visual: bool = True) -> tuple[Path, Path]:
    """A released-style pair: folder/base, a plain Qwen3.5 base of `shape` (vision tower, Qwen's
    MTP, tokenizer stub: pad <|endoftext|> = 248044), and folder/adapter, a PEFT LoRA adapter
    (adapter_config.json written by peft's LoraConfig, bf16 adapter_model.safetensors; scaling
    alpha / r). -> (base, adapter). Open with open_adapter(adapter, base)."""
    from peft import LoraConfig
    folder, s = Path(folder), _shape(shape)
    base = write_shape_checkpoint(folder / "base", s, layers=layers, seed=seed, pipo=False,
                                  include_visual=include_visual)
    write_tokenizer_stub(base)
    adapter = folder / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, modules_to_save=SAVED_MODULES,
               base_model_name_or_path=s.repo, task_type="CAUSAL_LM",
               inference_mode=True).save_pretrained(str(adapter))
    state = adapter_tensors(s, layers, RandomTensors(seed), r, alpha)
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


def write_adapter_stack(folder: str | Path, shape: str | Shape, *, count: int = 2,
                        layers: int | None = None, seed: int = 0, r: int = 64, alpha: int = 128,
                        include_visual: bool = True) -> tuple[Path, list[Path]]:
    """A two-stage release like the PIPO authors' (rank 64, alpha 128 by default): the pair of
    write_adapter_pair (folder/base, folder/adapter = the SFT stage) plus folder/adapter-2 ...
    adapter-`count`, each a LoRA of the same targets and saved modules with other random
    factors (the OPD stage, trained over the merge of the ones before it). -> (base, adapters
    in merge order). Export with ``--base BASE --adapter A --adapter B``."""
    from peft import LoraConfig
    base, first = write_adapter_pair(folder, shape, layers=layers, seed=seed, r=r, alpha=alpha,
                                     include_visual=include_visual)
    adapters, s = [first], _shape(shape)
    for i in range(2, count + 1):
        adapter = Path(folder) / f"adapter-{i}"
        adapter.mkdir(parents=True, exist_ok=True)
        LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS,
                   modules_to_save=SAVED_MODULES, base_model_name_or_path=s.repo,
                   task_type="CAUSAL_LM", inference_mode=True).save_pretrained(str(adapter))
        state = adapter_tensors(s, layers, RandomTensors(seed + i - 1), r, alpha)
        save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
        adapters.append(adapter)
    return base, adapters


def parameter_counts(shape: str | Shape, layers: int | None = None) -> dict[str, int]:
    """Parameters per part of a checkpoint of `shape` ("text" includes an untied lm_head;
    base_* = the plain release, without the PIPO modules) and bytes of tensor data."""
    text = tensor_plan(shape, layers, pipo=True, include_visual=False)
    vision = [TensorSpec(k, v, torch.bfloat16) for k, v in vision_shapes(shape).items()]
    parts = {"text": [t for t in text if not t.key.startswith(("mtp.", "compressor.",
                                                               "confidence_head."))],
             "mtp": [t for t in text if t.key.startswith("mtp.")],
             "pipo_modules": [t for t in text if t.key.startswith(("compressor.",
                                                                   "confidence_head."))],
             "vision": vision}
    counts = {k: sum(math.prod(t.shape) for t in v) for k, v in parts.items()}
    counts["base_total"] = counts["text"] + counts["mtp"] + counts["vision"]
    counts["total"] = counts["base_total"] + counts["pipo_modules"]
    counts["bytes"] = sum(t.nbytes for t in text + vision)
    counts["base_bytes"] = counts["bytes"] - sum(t.nbytes for t in parts["pipo_modules"])
    return counts
