"""Open a PIPO checkpoint (a folder, or a PEFT adapter over a Qwen3.5 base) and check it
against its config without reading a weight; build models from it tensor by tensor.

`open_checkpoint` -> (PipoConfig, TensorSource, CheckpointLayout): everything the exporter
needs; weights are read later, one at a time. `load_checkpoint` builds a whole eval-mode
PipoModel (for the torch reference on models that fit in memory). `skeleton` builds the model
on the meta device: shapes only, with the real RoPE buffers, for tracing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

from pipo_export.errors import CheckpointError
from pipo_export.model.config import CompressorType, PipoConfig, load_config
from pipo_export.model.modules import PipoModel
from pipo_export.model.source import SafetensorsSource, TensorSource

PIPO_MODULES = ("compressor", "mtp", "confidence_head")
LM_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


@dataclass
class CheckpointLayout:
    """What the loader found, for `inspect` and error messages."""

    folder: Path
    weight_files: list[Path]
    key_prefix: str  # "model." or "model.language_model."
    config_layout: str
    tied_lm_head: bool
    weight_dtypes: list[str]
    ignored_keys: list[str] = field(default_factory=list)
    adapter: Path | None = None  # the (first) PEFT adapter folder merged over `folder`
    adapters: list[Path] = field(default_factory=list)  # every adapter, in merge order


def torch_dtype(dtype) -> torch.dtype:
    """A contract dtype (pipo_graphs.dtypes.DType or its name) as a torch dtype."""
    return getattr(torch, getattr(dtype, "value", dtype))


def skeleton(cfg: PipoConfig) -> PipoModel:
    """The model on the meta device (no memory): parameter names and shapes, plus real CPU RoPE
    buffers (the only values tracing reads)."""
    with torch.device("meta"):
        model = PipoModel(cfg)
    model.model.rotary_emb = Qwen3_5TextRotaryEmbedding(config=cfg.text)
    return model.eval()


def expected_shapes(model: PipoModel) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape a checkpoint must provide (a tied lm_head is not stored)."""
    tied = model.config.text.tie_word_embeddings
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
            if not (tied and n == LM_HEAD)}


def infer_compressor(cfg: PipoConfig, names: set[str]) -> CompressorType:
    if cfg.compressor_type is not None:
        return cfg.compressor_type
    if "compressor.mlp.0.weight" in names:
        return CompressorType.MLP
    if "compressor.linear.weight" in names:
        return CompressorType.LINEAR
    raise CheckpointError("config.json has no compressor_type and the weights hold neither "
                          "compressor.mlp.* nor compressor.linear.*")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check_source(cfg: PipoConfig, source: TensorSource, where) -> PipoModel:
    """Names and shapes of `source` against the config (no tensor is read, except a stored
    lm_head of a tied model, which must equal the embedding). -> the meta skeleton."""
    names = set(source.names())
    missing_modules = [m for m in PIPO_MODULES if not any(n.startswith(m + ".") for n in names)]
    if missing_modules:
        plain = " (this looks like a plain Qwen3.5 checkpoint)" if len(missing_modules) == 3 else ""
        raise CheckpointError(f"{where}: missing PIPO modules {', '.join(missing_modules)}{plain}; "
                              "a PIPO checkpoint also holds compressor.*, mtp.* and "
                              "confidence_head.* (or pass the released adapter folder with --base)")
    cfg.compressor_type = infer_compressor(cfg, names)
    model = skeleton(cfg)
    expected = expected_shapes(model)
    if cfg.text.tie_word_embeddings and LM_HEAD in names:
        names.discard(LM_HEAD)
        if not torch.equal(source.get(LM_HEAD), source.get(EMBED)):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight "
                                  "differs from model.embed_tokens.weight; set "
                                  "tie_word_embeddings false")
    missing = sorted(expected.keys() - names)
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {_listing(missing)}")
    unused = sorted(names - expected.keys())
    if unused:
        raise CheckpointError(f"{where}: tensors left unused (not part of a PIPO model with this "
                              f"config): {_listing(unused)}")
    for name in sorted(expected):
        if tuple(source.shape(name)) != expected[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(source.shape(name))}, "
                                  f"expected {expected[name]} from config.json")
        if source.dtype(name) not in FLOAT_WEIGHTS:
            raise CheckpointError(f"{where}: tensor {name} is stored as {source.dtype(name)}; "
                                  f"weights are {', '.join(FLOAT_WEIGHTS)}")
    return model


FLOAT_WEIGHTS = ("float32", "bfloat16", "float16")  # stored dtypes a PIPO weight may have


def checkpoint_stack(path: str | Path | None, base: str | Path | None = None,
                     adapters=()) -> tuple[Path | None, list[Path]]:
    """(checkpoint folder, []) or (None, adapter folders in merge order) from the three ways
    of naming a model: CHECKPOINT; ADAPTER --base BASE; [ADAPTER] --base BASE --adapter A ...
    (a positional adapter folder is merged first)."""
    from pipo_export.model.adapters import adapter_list, is_adapter_folder
    stack = adapter_list(adapters)
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint folder")
        if not is_adapter_folder(folder):
            if base is not None or stack:
                raise CheckpointError(f"{folder} is not an adapter folder (no "
                                      "adapter_config.json); --base and --adapter are only for "
                                      "PEFT adapters")
            return folder, []
        stack.insert(0, folder)
    elif not stack:
        raise CheckpointError("no checkpoint given: pass a checkpoint folder, or --base BASE "
                              "--adapter ADAPTER")
    return None, stack


CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # the files load_checkpoint may read


def checkpoint_files(folder: str | Path, base: str | Path | None = None,
                     adapters=()) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} of every .json and .safetensors file at the top of a
    checkpoint (or first adapter) folder, of its `base` (as "base/NAME") and of the adapters
    stacked after it (as "adapterN/NAME", N = 1, 2, ...): what an export records of its source
    (manifest export.source_files) and the torch backend checks again."""
    from pipo_graphs.manifest import sha256_file
    out = {}
    roots = [("", folder), ("base/", base)] + [(f"adapter{i}/", a)
                                              for i, a in enumerate(adapters, 1)]
    for prefix, root in roots:
        if root is None:
            continue
        for f in sorted(Path(root).iterdir()):
            if f.suffix in CHECKPOINT_SUFFIXES and f.is_file():
                out[prefix + f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def open_checkpoint(path: str | Path | None, base: str | Path | None = None, adapters=()
                    ) -> tuple[PipoConfig, TensorSource, CheckpointLayout]:
    """A checkpoint folder, or PEFT adapter folders over `base` (`path` if it is one, then
    `adapters`, merged in order) -> (config, source, layout), names and shapes checked, no
    weight read."""
    from pipo_export.model.adapters import open_adapter
    folder, stack = checkpoint_stack(path, base, adapters)
    if stack:
        cfg, source = open_adapter(stack, base)
        files_of = source.root
    else:
        cfg = load_config(folder)
        source = files_of = SafetensorsSource.open(folder)
    check_source(cfg, source, folder or stack[-1])
    layout = CheckpointLayout(
        folder=files_of.folder, weight_files=files_of.files, key_prefix=files_of.key_prefix,
        config_layout=cfg.config_layout, tied_lm_head=bool(cfg.text.tie_word_embeddings),
        weight_dtypes=files_of.stored_dtypes(), ignored_keys=files_of.ignored,
        adapter=stack[0] if stack else None, adapters=stack)
    return cfg, source, layout


def materialize(module: torch.nn.Module, source: TensorSource, dtype: torch.dtype,
                prefix: str = "") -> torch.nn.Module:
    """Give every parameter of `module` (meta or not) its tensor `prefix + name` from `source`,
    in `dtype`, one tensor at a time. Tied parameters are read once."""
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        value = source.get(prefix + name).to(dtype)
        setattr(target, leaf, torch.nn.Parameter(value, requires_grad=False))
    return module


def load_checkpoint(path: str | Path | None, dtype: torch.dtype = torch.float32,
                    base: str | Path | None = None, adapters=()) -> PipoModel:
    """Load a PIPO checkpoint (or adapters merged in order over a base; see open_checkpoint)
    into an eval-mode PipoModel of `dtype`."""
    cfg, source, _ = open_checkpoint(path, base, adapters)
    model = materialize(skeleton(cfg), source, dtype)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
