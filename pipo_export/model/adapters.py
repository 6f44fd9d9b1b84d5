"""PEFT LoRA adapters over plain Qwen3.5 checkpoints: read, merge tensor by tensor, write.

PIPO authors release a model as PEFT adapter folders (adapter_config.json +
adapter_model.safetensors, keys ``base_model.model.<module>...``; ms-swift writes the same,
see adapter_config.py) over a plain Qwen3.5 base, possibly stacked: an SFT adapter over the
base, then an OPD adapter trained over the SFT-merged model. Each folder holds
- LoRA factors of 2-D weights: ``<module>.lora_A.weight`` [r, in], ``<module>.lora_B.weight``
  [out, r]; for an embedding ``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [H, r];
- full tensors of ``modules_to_save`` (compressor, confidence head, MTP fc and norms), which
  replace base tensors or add ones the base lacks.
Which keys apply follows peft's loading: factors only of modules its rules target
(target_modules, layers_to_transform/layers_pattern, exclude_modules, never inside
modules_to_save); full tensors under modules_to_save, at ``<target>.base_layer.*``, or naming a
model parameter outside a target (load_state_dict(strict=False) loads those); every other key
is ignored, as peft ignores it.
`AdapterSource` shows base + adapter as one TensorSource and merges on read as peft's
``merge_and_unload`` does: ``W' = W + (B @ A) * scaling`` ([out, in]; transposed for embeddings)
in float32, ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rslora), r and alpha per module by
peft's own rank_pattern / alpha_pattern matching. fan_in_fan_out is ignored, as peft ignores it
for nn.Linear targets (every Qwen3.5/PIPO projection). A tied lm_head follows the embedding.
Stacked adapters are AdapterSources over AdapterSources; each later adapter sees the earlier
merge as stored (in the base's dtypes), its modules_to_save replace earlier tensors.
`write_merged` (the ``merge`` command) writes the merged folder shard by shard.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from pipo_graphs.dtypes import SAFETENSORS_DTYPES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipo_export.errors import CheckpointError
from pipo_export.fsutil import read_checkpoint_json
from pipo_export.model.adapter_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig
from pipo_export.model.config import PipoConfig, eos_from_generation_config, parse_config
from pipo_export.model.source import (DEFAULT_SHARD_BYTES, INDEX_FILE, SafetensorsSource,
                                      TensorSource, all_finite, normalize_key)

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                 ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
PIPO_PREFIXES = ("compressor.", "confidence_head.")  # parameters of every PIPO model
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json", "generation_config.json", "preprocessor_config.json",
                "video_preprocessor_config.json")


def is_adapter_folder(path: str | Path) -> bool:
    """True when `path` is a PEFT adapter folder (holds adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class LoraDelta:
    """One LoRA pair: a [r, in], b [out, r] (embedding: a [r, V], b [H, r])."""

    module: str  # as trained, e.g. "model.language_model.layers.3.self_attn.q_proj"
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transpose: bool  # embeddings: the delta is (B @ A).T

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def delta(self) -> torch.Tensor:
        """The float32 weight delta, shaped like the weight it merges into."""
        d = self.b.float() @ self.a.float()
        return (d.T if self.transpose else d) * self.scaling


class AdapterSource:
    """A TensorSource: `base` with a PEFT LoRA adapter folder merged in, tensor by tensor.

    names(): every base name plus the adapter's full tensors the base lacks (compressor, ...).
    get(name): the adapter's full tensor if it saved one, else the base tensor; with LoRA
    merged in float32 (returned as float32: the caller casts), else as stored. Over another
    AdapterSource, the base tensor is first cast to its stored dtype (the merged model the
    later adapter was trained over, as saved).
    dtype(name): the dtype to store `name` in (the base's; the adapter's for adapter-only ones).
    ignored: adapter keys peft would not load (not selected by its rules).
    """

    def __init__(self, base: TensorSource, adapter_folder: str | Path,
                 config: AdapterConfig | None = None, tied: bool | None = None):
        self.base, self.folder = base, Path(adapter_folder)
        self.config = config or AdapterConfig.read(adapter_folder)
        self._base_names = set(base.names())
        self.tied = (LM_HEAD not in self._base_names) if tied is None else tied
        self.file = self.folder / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(self.file))  # the safetensors library checks the header
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.file}: cannot read safetensors ({exc})") from None
        for key, value in tensors.items():
            if not all_finite(value):
                raise CheckpointError(f"{self.file}: tensor {key} holds NaN or Inf; the adapter "
                                      "is corrupt (save or download it again)")
        self.replacements: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, list[LoraDelta]] = {}
        self.ignored: list[str] = []
        self._classify(tensors)
        self._validate()

    @property
    def root(self) -> SafetensorsSource:
        """The checkpoint folder under every adapter of the stack."""
        return getattr(self.base, "root", self.base)

    def _trained_modules(self, language_model: bool) -> set[str]:
        """Module names of the model the adapter was trained on (from the base's and the
        adapter's tensor names, with the wrapper's ``model.language_model.`` when its keys
        have it): what peft's target rules ran over."""
        names = set(self._base_names) | set(self.replacements)
        if language_model:
            names = {"model.language_model." + n[6:] if n.startswith("model.") else n
                     for n in names} | set(self.root.ignored)
        return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}

    def _applies(self, path: str, module: str) -> bool:
        """Whether peft loads the full tensor at `path` (named as trained) into the model."""
        if ".base_layer." in path:  # a target's own weight or bias
            return self.config.targets(path.partition(".base_layer.")[0])
        if self.config.saves_module(module):
            return True
        if ".lora_" in path or self.config.targets(module):
            return False  # a target's parameters live under base_layer: unexpected key
        name = normalize_key(path)[0]  # a parameter of the model (lm_head even when tied)?
        return (name is None or name in self._base_names or name == LM_HEAD
                or name.startswith(PIPO_PREFIXES))

    def _classify(self, tensors: dict[str, torch.Tensor]) -> None:
        halves: dict[str, dict] = {}
        for key, value in sorted(tensors.items()):
            path = key.removeprefix(PEFT_PREFIX)
            lora = next(((path[:-len(s)], *v) for s, v in LORA_SUFFIXES.items()
                         if path.endswith(s)), None)
            full = path.replace(".base_layer.", ".")
            applied = (self.config.targets(lora[0]) if lora
                       else self._applies(path, full.rpartition(".")[0]))
            if not applied:
                self.ignored.append(key)
                continue
            name = normalize_key(lora[0] + ".weight" if lora else full)[0]
            if name is None:
                raise CheckpointError(f"{self.file}: {key} is in the vision tower; pipo-export "
                                      "merges the text model only (drop vision LoRA)")
            if lora:
                halves.setdefault(lora[0], {"name": name, "emb": lora[2]})[lora[1]] = value
            else:
                self.replacements[name] = value
        language_model = any(k.startswith(PEFT_PREFIX + "model.language_model.") for k in tensors)
        self.config.check_targets_exist(self._trained_modules(language_model))
        for module, h in sorted(halves.items()):
            if "A" not in h or "B" not in h:
                have, lack = ("A", "B") if "A" in h else ("B", "A")
                raise CheckpointError(f"{self.file}: {module} has lora_{have} but no lora_{lack}")
            r, scaling = self.config.scaling(module)
            d = LoraDelta(module, h["A"], h["B"], scaling, transpose=h["emb"])
            if d.a.ndim != 2 or d.b.ndim != 2:
                raise CheckpointError(f"{self.folder}: LoRA on {module} has factors of "
                                      f"{d.a.ndim}-D and {d.b.ndim}-D (conv LoRA); pipo-export "
                                      "merges LoRA into 2-D weights only")
            if not d.a.shape[0] == d.b.shape[1] == r:
                raise CheckpointError(f"{self.folder}: {module} has lora_A {tuple(d.a.shape)}, "
                                      f"lora_B {tuple(d.b.shape)} but {ADAPTER_CONFIG} gives "
                                      f"r={r}; the config does not belong to these weights")
            self.deltas.setdefault(h["name"], []).append(d)
        if not self.tied:
            return
        head = self.replacements.pop(LM_HEAD, None)
        if head is not None and not torch.equal(head, self.replacements.get(EMBED, head[:0])):
            raise CheckpointError(f"{self.folder}: the adapter saves lm_head.weight but the base "
                                  "ties it to embed_tokens; save embed_tokens instead")
        both = self.deltas.pop(EMBED, []) + self.deltas.pop(LM_HEAD, [])  # one shared tensor:
        for name in (EMBED, LM_HEAD):  # embedding LoRA moves lm_head and vice versa
            if both and (name == EMBED or name in self._base_names):
                self.deltas[name] = both

    def _validate(self) -> None:
        """Shapes only: every full tensor and every LoRA pair against the base."""
        named = self.config.base_model_name_or_path
        fix = f"; use the base the adapter was trained on{f' ({named})' if named else ''}"
        for name, value in self.replacements.items():
            want = tuple(self.base.shape(name)) if name in self._base_names else None
            if want and tuple(value.shape) != want:
                raise CheckpointError(f"{self.folder}: modules_to_save tensor {name} has shape "
                                      f"{tuple(value.shape)} but the base's is {want}{fix}")
        known = self._base_names | self.replacements.keys()
        for name, deltas in self.deltas.items():
            shape = self.shape(name) if name in known else None
            for d in deltas:
                if shape is None:
                    raise CheckpointError(f"{self.folder}: LoRA on {d.module} but the base has no "
                                          f"{name}{fix}")
                if len(shape) != 2:
                    raise CheckpointError(f"{self.folder}: LoRA on {d.module}, whose {name} is "
                                          f"{shape}; pipo-export merges LoRA into 2-D weights only")
                if d.shape != shape:
                    raise CheckpointError(f"{self.folder}: LoRA on {d.module} is {d.shape} (lora_A "
                                          f"{tuple(d.a.shape)}, lora_B {tuple(d.b.shape)}) but the "
                                          f"base's {name} is {shape}{fix}")

    def names(self) -> list[str]:
        return sorted(self._base_names | self.replacements.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.replacements:
            return tuple(self.replacements[name].shape)
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> str:
        if name in self._base_names:
            return self.base.dtype(name)
        return str(self.replacements[name].dtype).removeprefix("torch.")

    def get(self, name: str) -> torch.Tensor:
        if name in self.replacements:
            weight = self.replacements[name]
        elif isinstance(self.base, AdapterSource):  # the earlier merge, as it would be saved
            weight = self.base.get(name).to(getattr(torch, self.base.dtype(name)))
        else:
            weight = self.base.get(name)
        for d in self.deltas.get(name, []):
            weight = weight.float() + d.delta()  # peft: W.data += delta (same float32 sum)
        return weight


def _pad_token_id(adapters: list[Path], base: Path, raw: dict):
    """pad_token_id from an adapter's config.json (the last one that has it), the base config,
    or the base tokenizer (checked against the vocabulary by parse_config)."""
    for c in [read_checkpoint_json(a / "config.json", {}) for a in reversed(adapters)] + [raw]:
        for d in (c, c.get("text_config") or {}):
            if d.get("pad_token_id") is not None:
                return d["pad_token_id"]
    tc = read_checkpoint_json(base / "tokenizer_config.json", {})
    pad = tc.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad:
        tok = read_checkpoint_json(base / "tokenizer.json", {})
        vocab = (tok.get("model") or {}).get("vocab")
        ids = dict(vocab) if isinstance(vocab, dict) else {}
        ids.update({t.get("content"): t.get("id") for t in tok.get("added_tokens", [])})
        ids.update({v.get("content"): int(k)
                    for k, v in (tc.get("added_tokens_decoder") or {}).items()})
        if ids.get(pad) is not None:
            return ids[pad]
    raise CheckpointError(f"{base}: no pad_token_id in config.json and no pad_token in "
                          f"tokenizer_config.json; write {{\"pad_token_id\": ID}} to "
                          f"{adapters[-1] / 'config.json'} (248044 for the Qwen3.5 tokenizer)")


def adapter_list(adapters) -> list[Path]:
    """One adapter folder or a sequence of them (merged in order) -> list of Paths."""
    if isinstance(adapters, (str, Path)):
        return [Path(adapters)]
    return [Path(a) for a in adapters or ()]


def _compressor_type(base_cfg: str | None, acfgs: list[AdapterConfig], names: list[str]):
    """The compressor type: from the keys (compressor.mlp.* / compressor.linear.*), which must
    agree with what the base config or an adapter's ms-swift config says (the last one)."""
    keyed = ("mlp" if "compressor.mlp.0.weight" in names else
             "linear" if "compressor.linear.weight" in names else None)
    said = [(a.folder, a.compressor_type) for a in acfgs if a.compressor_type]
    where, declared = said[-1] if said else ("the base config.json", base_cfg)
    if declared and keyed and declared != keyed:
        raise CheckpointError(f"{where}: compressor_type {declared!r} but the weights hold "
                              f"compressor.{keyed}.*; fix compressor_type")
    return keyed or declared


def open_merged(adapters, base_folder: str | Path | None
                ) -> tuple[PipoConfig, AdapterSource, dict]:
    """`adapters` (a folder, or folders merged in order) over `base_folder` -> (config, merged
    source, config.json to write: the base's + PIPO fields), validated up front from headers
    and shapes (no base weight is read)."""
    folders = adapter_list(adapters)
    if not folders:
        raise CheckpointError("no adapter given; pass --adapter FOLDER with --base BASE")
    acfgs = [AdapterConfig.read(a) for a in folders]
    if base_folder is None:
        named = acfgs[0].base_model_name_or_path
        raise CheckpointError("--base BASE is required for an adapter folder"
                              + (f" ({folders[0]} names {named})" if named else ""))
    base = Path(base_folder)
    if not base.is_dir():
        raise CheckpointError(f"base folder {base} not found")
    if is_adapter_folder(base):
        raise CheckpointError(f"{base} is itself an adapter folder; --base takes the full model "
                              "(stack adapters with --adapter A --adapter B)")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: no config.json; the base is a Hugging Face Qwen3.5 folder")
    raw = read_checkpoint_json(base / "config.json")
    parse_config(dict(raw, pad_token_id=0), str(base / "config.json"))  # layout errors first
    text = raw["text_config"] if raw.get("model_type") == "qwen3_5" else raw
    tied = bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    source = SafetensorsSource.open(base)
    for acfg in acfgs:  # each adapter over the merge of the ones before it
        source = AdapterSource(source, acfg.folder, acfg, tied=tied)
    names = source.names()
    if not any(n.startswith("mtp.") for n in names):
        raise CheckpointError(f"{base}: no mtp.* tensors; pass the original Qwen3.5 release as "
                              "--base (a model re-saved by transformers has lost its MTP weights)")
    comp = _compressor_type(raw.get("compressor_type") or text.get("compressor_type"), acfgs, names)
    if comp is None or not any(n.startswith("confidence_head.") for n in names):
        lacking = "compressor" if comp is None else "confidence_head"
        raise CheckpointError(f"{folders[-1]}: no {lacking} tensors in adapter or base; a PIPO "
                              "adapter saves compressor and confidence_head in modules_to_save")
    fields = {"compressor_type": comp, "mtp_num_hidden_layers": 1,
              "pad_token_id": _pad_token_id(folders, base, raw)}
    config_json = json.loads(json.dumps(raw))
    config_json.update(fields)  # top level: beside text_config for the wrapper
    inner = config_json.get("text_config") or {}
    for key in fields.keys() & inner.keys():  # no disagreeing copy inside text_config
        inner[key] = fields[key]
    cfg = parse_config(config_json, str(base / "config.json"))
    eos_from_generation_config(cfg, base)  # as load_config does; ids checked against the vocab
    return cfg, source, config_json


def open_adapter(adapters, base_folder: str | Path | None) -> tuple[PipoConfig, TensorSource]:
    """(PipoConfig = the base config + PIPO fields, TensorSource of the merged tensors) of one
    adapter folder or a sequence of them, merged in order over `base_folder`."""
    return open_merged(adapters, base_folder)[:2]


def write_merged(adapters, base_folder: str | Path | None, out: str | Path,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None,
                 force: bool = False) -> list[str]:
    """Write the adapter(s) merged into the base as a Hugging Face folder, a shard at a time.

    Keys keep the base's layout (``model.language_model.*`` stays), visual tensors are copied
    unchanged, each text tensor is stored in the base's dtype (the adapter's for tensors the
    base lacks) unless `dtype` ("float32", "float16", "bfloat16") is given. Shards are
    ``model-0000i-of-0000N.safetensors`` + index (one shard: ``model.safetensors``); config.json
    is the base's plus the PIPO fields; tokenizer files are copied from the base.
    """
    from pipo_graphs.dtypes import itemsize

    from pipo_export.fsutil import atomic_dir
    _, src, config_json = open_merged(adapters, base_folder)
    base = src.root
    dtype = getattr(dtype, "value", dtype)
    items = []  # (stored key, reader, bytes)
    for name in src.names():
        key = base.key_prefix + name[len("model."):] if name.startswith("model.") else name
        dt = dtype or src.dtype(name)
        items.append((key, lambda n=name, d=dt: src.get(n).to(getattr(torch, d)),
                      math.prod(src.shape(name)) * itemsize(dt)))
    for path in base.files if base.ignored else []:  # the vision tower, copied through
        with safe_open(str(path), framework="pt") as f:
            for key in (k for k in f.keys() if normalize_key(k)[0] is None):
                info = f.get_slice(key)
                dt = SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype())
                items.append((key, lambda p=path, k=key: safe_open(str(p), "pt").get_tensor(k),
                              math.prod(info.get_shape()) * itemsize(dt)))
    shards: list[list] = [[]]
    for item in items:
        if shards[-1] and sum(i[2] for i in shards[-1]) + item[2] > shard_bytes:
            shards.append([])
        shards[-1].append(item)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(i[2] for i in items)
    with atomic_dir(out, force) as tmp:
        for shard, fname in zip(shards, files):  # only this shard's tensors are in memory
            save_file({k: read().contiguous() for k, read, _ in shard}, str(tmp / fname),
                      metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {k: fname for shard, fname in zip(shards, files) for k, _, _ in shard}
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        for fname in COPIED_FILES:
            if (base.folder / fname).is_file():
                shutil.copy2(base.folder / fname, tmp / fname)
    return files
