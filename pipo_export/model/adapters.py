"""PEFT LoRA adapters over plain Qwen3.5 checkpoints: read, merge tensor by tensor, write.

PIPO authors release a model as a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors, keys ``base_model.model.<module>...``) over a plain Qwen3.5 base:
- LoRA factors of 2-D weights: ``<module>.lora_A.weight`` [r, in], ``<module>.lora_B.weight``
  [out, r]; for an embedding ``lora_embedding_A`` [r, V] and ``lora_embedding_B`` [H, r];
- full tensors of ``modules_to_save`` (compressor, confidence head, MTP fc and norms), which
  replace base tensors or add ones the base lacks (so are saved embedding layers and, with
  ``bias`` other than "none", trained biases).
`AdapterSource` shows base + adapter as one TensorSource and merges on read as peft's
``merge_and_unload`` does: ``W' = W + (B @ A) * scaling`` ([out, in]; transposed for embeddings)
in float32, ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rslora), r and alpha per module by
peft's own rank_pattern / alpha_pattern matching. fan_in_fan_out is ignored, as peft ignores it
for nn.Linear targets (every Qwen3.5/PIPO projection). A tied lm_head follows the embedding.
`write_merged` (the ``merge`` command) writes the merged folder shard by shard.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pipo_graphs.dtypes import SAFETENSORS_DTYPES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipo_export.errors import CheckpointError
from pipo_export.fsutil import read_checkpoint_json
from pipo_export.model.config import PipoConfig, parse_config
from pipo_export.model.source import DEFAULT_SHARD_BYTES, INDEX_FILE, SafetensorsSource, TensorSource, \
    normalize_key

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                 ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
EMBEDDINGS = ("embed_tokens", "lm_head")  # peft may save these whole
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")  # they change the base at init
UNSUPPORTED = {  # LoraConfig field -> what it is; a truthy value is refused
    "use_dora": "DoRA (use_dora)", "layer_replication": "layer_replication",
    "lora_bias": "lora_bias", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices", "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
    "monteclora_config": "MonteCLoRA", "use_qalora": "QALoRA", "megatron_config": "Megatron"}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json", "generation_config.json", "preprocessor_config.json",
                "video_preprocessor_config.json")


def is_adapter_folder(path: str | Path) -> bool:
    """True when `path` is a PEFT adapter folder (holds adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class AdapterConfig:
    """adapter_config.json, parsed by peft's own LoraConfig and checked for what we merge."""

    folder: Path
    lora: object  # peft.LoraConfig
    base_model_name_or_path: str | None = None

    @classmethod
    def read(cls, folder: str | Path) -> "AdapterConfig":
        """Check the folder's files, parse its config, refuse what plain LoRA merging cannot do."""
        from peft import PeftConfig, PeftType
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"adapter folder {folder} not found")
        if not (folder / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; a PEFT adapter folder holds "
                                  f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (save_pretrained)")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            if (folder / "adapter_model.bin").is_file():
                raise CheckpointError(f"{folder}: adapter_model.bin must be converted to "
                                      f"{ADAPTER_WEIGHTS} (torch.load, safetensors save_file)")
            raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
        path = folder / ADAPTER_CONFIG
        read_checkpoint_json(path)  # a clear error for a broken file; peft reads it below
        raw = PeftConfig.from_json_file(str(path))
        kind = str(raw.get("peft_type") or "untyped (no peft_type)")
        if kind != PeftType.LORA.value:
            raise CheckpointError(f"{path}: {kind} adapters are not supported; pipo-export merges "
                                  "LoRA adapters")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lora = PeftConfig.from_peft_type(**raw)
        except Exception as exc:  # peft raises ValueError/TypeError/ImportError on bad fields
            raise CheckpointError(f"{path}: peft cannot parse this LoRA config ({exc})") from None
        for name in ("r", "lora_alpha"):
            value = getattr(lora, name, None)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0 or (
                    name == "r" and not isinstance(value, int)):
                raise CheckpointError(f"{path}: {name} is {value!r}; expected a "
                                      f"{'positive integer' if name == 'r' else 'number > 0'}")
        for name, what in UNSUPPORTED.items():
            if getattr(lora, name, None):
                raise CheckpointError(f"{path}: {what} adapters are not supported; pipo-export "
                                      "merges plain LoRA (merge with peft's merge_and_unload "
                                      "and pass the merged checkpoint instead)")
        init = lora.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
            raise CheckpointError(
                f"{path}: init_lora_weights={init!r} changed the base weights at init, so the "
                "adapter does not fit the released base; convert it to plain LoRA with "
                "save_pretrained(path_initial_model_for_weight_conversion=...)")
        return cls(folder, lora, raw.get("base_model_name_or_path"))

    def scaling(self, module: str) -> tuple[int, float]:
        """(r, scaling) of `module`, named as trained (model.layers.3.self_attn.q_proj)."""
        from peft.utils.other import get_pattern_key
        ranks, alphas = self.lora.rank_pattern or {}, self.lora.alpha_pattern or {}
        r = ranks.get(get_pattern_key(ranks.keys(), module), self.lora.r)
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), self.lora.lora_alpha)
        return int(r), (alpha / math.sqrt(r) if self.lora.use_rslora else alpha / r)

    def saves_module(self, module: str) -> bool:
        """peft's modules_to_save rule (plain suffix match) on `module` or a parent of it."""
        parts = module.split(".")
        return any(".".join(parts[:i]).endswith(t) for t in self.lora.modules_to_save or []
                   for i in range(1, len(parts) + 1))


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
    merged in float32 (returned as float32: the caller casts), else as stored.
    dtype(name): the dtype to store `name` in (the base's; the adapter's for adapter-only ones).
    """

    def __init__(self, base: TensorSource, adapter_folder: str | Path,
                 config: AdapterConfig | None = None, tied: bool | None = None):
        self.base, self.folder = base, Path(adapter_folder)
        self.config = config or AdapterConfig.read(adapter_folder)
        self._base_names = set(base.names())
        self.tied = (LM_HEAD not in self._base_names) if tied is None else tied
        self.file = self.folder / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(self.file))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.file}: cannot read safetensors ({exc})") from None
        self.replacements: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, list[LoraDelta]] = {}
        self._classify(tensors)
        self._validate()

    def _classify(self, tensors: dict[str, torch.Tensor]) -> None:
        halves: dict[str, dict] = {}
        for key, value in tensors.items():
            path = key.removeprefix(PEFT_PREFIX)
            lora = next(((path[:-len(s)], *v) for s, v in LORA_SUFFIXES.items()
                         if path.endswith(s)), None)
            full = path.replace(".base_layer.", ".")
            name = normalize_key(lora[0] + ".weight" if lora else full)[0]
            if name is None:
                raise CheckpointError(f"{self.file}: {key} is in the vision tower; pipo-export "
                                      "merges the text model only (drop vision LoRA)")
            if lora:
                halves.setdefault(lora[0], {"name": name, "emb": lora[2]})[lora[1]] = value
                continue
            module = full.rpartition(".")[0]
            saved = (self.config.saves_module(module) or module.rpartition(".")[2] in EMBEDDINGS
                     or (self.config.lora.bias != "none" and full.endswith(".bias")))
            if ".lora_" in path or not saved:
                raise CheckpointError(f"{self.file}: {key} is neither a LoRA factor nor under "
                                      f"modules_to_save; list its module in {ADAPTER_CONFIG} "
                                      "modules_to_save or remove it")
            self.replacements[name] = value
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
        weight = self.replacements[name] if name in self.replacements else self.base.get(name)
        for d in self.deltas.get(name, []):
            weight = weight.float() + d.delta()  # peft: W.data += delta (same float32 sum)
        return weight


def _pad_token_id(adapter: Path, base: Path, raw: dict) -> int:
    """pad_token_id from the adapter's config.json, the base config, or the base tokenizer."""
    for c in (read_checkpoint_json(adapter / "config.json", {}), raw):
        for d in (c, c.get("text_config") or {}):
            if d.get("pad_token_id") is not None:
                return int(d["pad_token_id"])
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
            return int(ids[pad])
    raise CheckpointError(f"{base}: no pad_token_id in config.json and no pad_token in "
                          f"tokenizer_config.json; write {{\"pad_token_id\": ID}} to "
                          f"{adapter / 'config.json'} (248044 for the Qwen3.5 tokenizer)")


def open_merged(adapter_folder: str | Path,
                base_folder: str | Path | None) -> tuple[PipoConfig, AdapterSource, dict]:
    """(config, merged source, config.json to write: the base's + PIPO fields), validated up
    front from headers and shapes (no base weight is read)."""
    acfg = AdapterConfig.read(adapter_folder)
    if base_folder is None:
        named = acfg.base_model_name_or_path
        raise CheckpointError("--base BASE is required for an adapter folder"
                              + (f" ({ADAPTER_CONFIG} names {named})" if named else ""))
    base = Path(base_folder)
    if not base.is_dir():
        raise CheckpointError(f"base folder {base} not found")
    if is_adapter_folder(base):
        raise CheckpointError(f"{base} is itself an adapter folder; --base takes the full model")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: no config.json; the base is a Hugging Face Qwen3.5 folder")
    raw = read_checkpoint_json(base / "config.json")
    parse_config(dict(raw, pad_token_id=0), str(base / "config.json"))  # layout errors first
    text = raw["text_config"] if raw.get("model_type") == "qwen3_5" else raw
    tied = bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    source = AdapterSource(SafetensorsSource.open(base), adapter_folder, acfg, tied=tied)
    names = source.names()
    if not any(n.startswith("mtp.") for n in names):
        raise CheckpointError(f"{base}: no mtp.* tensors; pass the original Qwen3.5 release as "
                              "--base (a model re-saved by transformers has lost its MTP weights)")
    comp = raw.get("compressor_type") or text.get("compressor_type") or (
        "mlp" if "compressor.mlp.0.weight" in names else
        "linear" if "compressor.linear.weight" in names else None)
    if comp is None or not any(n.startswith("confidence_head.") for n in names):
        lacking = "compressor" if comp is None else "confidence_head"
        raise CheckpointError(f"{adapter_folder}: no {lacking} tensors in adapter or base; a PIPO "
                              "adapter saves compressor and confidence_head in modules_to_save")
    fields = {"compressor_type": comp, "mtp_num_hidden_layers": 1,
              "pad_token_id": _pad_token_id(Path(adapter_folder), base, raw)}
    config_json = json.loads(json.dumps(raw))
    config_json.update(fields)  # top level: beside text_config for the wrapper
    inner = config_json.get("text_config") or {}
    for key in fields.keys() & inner.keys():  # no disagreeing copy inside text_config
        inner[key] = fields[key]
    cfg = parse_config(config_json, str(base / "config.json"))
    if not cfg.eos_token_ids:  # from generation_config.json, as load_config does
        eos = read_checkpoint_json(base / "generation_config.json", {}).get("eos_token_id")
        cfg.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])
                             if e is not None]
    return cfg, source, config_json


def open_adapter(adapter_folder: str | Path,
                 base_folder: str | Path | None) -> tuple[PipoConfig, TensorSource]:
    """(PipoConfig = the base config + PIPO fields, TensorSource of the merged tensors)."""
    return open_merged(adapter_folder, base_folder)[:2]


def write_merged(adapter_folder: str | Path, base_folder: str | Path | None, out: str | Path,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None,
                 force: bool = False) -> list[str]:
    """Write the adapter merged into the base as a Hugging Face folder, a shard at a time.

    Keys keep the base's layout (``model.language_model.*`` stays), visual tensors are copied
    unchanged, each text tensor is stored in the base's dtype (the adapter's for tensors the
    base lacks) unless `dtype` ("float32", "float16", "bfloat16") is given. Shards are
    ``model-0000i-of-0000N.safetensors`` + index (one shard: ``model.safetensors``); config.json
    is the base's plus the PIPO fields; tokenizer files are copied from the base.
    """
    from pipo_graphs.dtypes import itemsize

    from pipo_export.fsutil import atomic_dir
    _, src, config_json = open_merged(adapter_folder, base_folder)
    base = src.base
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
