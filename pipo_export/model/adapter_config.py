"""adapter_config.json (and what ms-swift writes beside it), read with peft's own rules.

A PEFT LoRA folder holds adapter_config.json + adapter_model.safetensors. ms-swift (the PIPO
authors' trainer) saves the same two files through peft's save_pretrained, plus:
- additional_config.json: its LoraConfig fields peft lacks, ``{"lora_dtype": null,
  "lorap_lr_ratio": null, "lorap_emb_lr": 1e-06}`` (swift/tuners/peft.py, LoraConfig.
  save_pretrained). None changes a merge: lora_dtype is the dtype the factors were trained (and
  are stored) in, the other two are optimizer knobs. The PIPO training plugin also reads
  ``compressor_type`` from adapter_config.json, then additional_config.json; so do we.
- args.json: every training argument (``model``, ``train_type``, ``lora_rank``, ``target_modules``
  as given on the command line, ...). Only ``model`` is used: it names the base in error hints.
- configuration.json: ModelScope's ``{"framework": ..., "task": ...}``; not read.
``target_modules`` may be a regex string (ms-swift writes one for multimodal models:
``^(model\\.language_model(?=\\.).*\\.(q_proj|...))$``); peft's own matching decides, below.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipo_export.errors import CheckpointError
from pipo_export.fsutil import read_checkpoint_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SWIFT_EXTRA, SWIFT_ARGS = "additional_config.json", "args.json"
COMPRESSOR_TYPES = ("mlp", "linear")
REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")  # they change the base at init
UNSUPPORTED = {  # LoraConfig field -> what it is; a truthy value is refused
    "use_dora": "DoRA (use_dora)", "layer_replication": "layer_replication",
    "lora_bias": "lora_bias", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices", "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
    "monteclora_config": "MonteCLoRA", "use_qalora": "QALoRA", "megatron_config": "Megatron"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_patterns(path: Path, lora) -> None:
    """rank_pattern values positive integers, alpha_pattern values finite numbers > 0, every
    key a valid regular expression (peft matches them with re.match)."""
    for name, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = getattr(lora, name, None) or {}
        if not isinstance(pattern, dict):
            raise CheckpointError(f"{path}: {name} is {pattern!r}; expected an object of "
                                  "module pattern -> value")
        for key, value in pattern.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0
                  if positive_int else _number(value) and math.isfinite(value) and value > 0)
            if not ok:
                want = "a positive integer" if positive_int else "a finite number > 0"
                raise CheckpointError(f"{path}: {name}[{key!r}] is {value!r}; expected {want}")
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise CheckpointError(f"{path}: {name} key {key!r} is not a valid regular "
                                      f"expression ({exc})") from None


def _compressor_type(folder: Path, raw: dict, extra: dict) -> str | None:
    for where, d in ((ADAPTER_CONFIG, raw), (SWIFT_EXTRA, extra)):
        value = d.get("compressor_type")
        if value is not None:
            if value not in COMPRESSOR_TYPES:
                raise CheckpointError(f"{folder / where}: compressor_type is {value!r}; expected "
                                      f"one of {', '.join(COMPRESSOR_TYPES)}")
            return value
    return None


@dataclass
class AdapterConfig:
    """adapter_config.json, parsed by peft's own LoraConfig and checked for what we merge."""

    folder: Path
    lora: object  # peft.LoraConfig
    base_model_name_or_path: str | None = None
    compressor_type: str | None = None  # ms-swift / PIPO plugin field, when saved
    swift: dict = field(default_factory=dict)  # additional_config.json ({} without ms-swift)

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
                warnings.simplefilter("ignore")  # ms-swift's extra fields: peft ignores them
                lora = PeftConfig.from_peft_type(**raw)
        except Exception as exc:  # peft raises ValueError/TypeError/ImportError on bad fields
            raise CheckpointError(f"{path}: peft cannot parse this LoRA config ({exc})") from None
        for name in ("r", "lora_alpha"):
            value = getattr(lora, name, None)
            if not _number(value) or not math.isfinite(value) or value <= 0 or (
                    name == "r" and not isinstance(value, int)):
                want = "positive integer" if name == "r" else "finite number > 0"
                raise CheckpointError(f"{path}: {name} is {value!r}; expected a {want}")
        _check_patterns(path, lora)
        if not lora.target_modules:
            raise CheckpointError(f"{path}: target_modules is {lora.target_modules!r}; peft "
                                  "needs target_modules for a qwen3_5 model")
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
        extra = read_checkpoint_json(folder / SWIFT_EXTRA, {})
        args = read_checkpoint_json(folder / SWIFT_ARGS, {})
        named = raw.get("base_model_name_or_path") or (
            args.get("model") if isinstance(args, dict) else None)
        extra = extra if isinstance(extra, dict) else {}
        return cls(folder, lora, named, _compressor_type(folder, raw, extra), extra)

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

    def targets(self, module: str) -> bool:
        """Whether peft puts a LoRA layer on `module` (named as trained): target_modules (list:
        exact or ``.suffix``; string: full regex match), layers_to_transform + layers_pattern,
        exclude_modules, and never inside modules_to_save; peft's own function decides."""
        from peft.tuners.tuners_utils import check_target_module_exists
        return bool(check_target_module_exists(self.lora, module))

    def check_targets_exist(self, modules: set[str]) -> None:
        """peft's refusal when its rules select none of the model's `modules` (inject_adapter)."""
        from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
        results = [check_target_module_exists(self.lora, m) for m in sorted(modules)]
        if any(r and not isinstance(r, _ExcludedModule) for r in results):
            return
        excluded = any(isinstance(r, _ExcludedModule) for r in results)
        unmatched = any(not isinstance(r, _ExcludedModule) for r in results)
        lora = self.lora
        if excluded and not unmatched:
            why = ("all modules were excluded; check target_modules, exclude_modules and "
                   "modules_to_save")
        elif not excluded:
            why = (f"target modules {lora.target_modules} not found in the base model; check "
                   "target_modules")
        else:
            why = ("no modules were targeted for adaptation (target_modules and "
                   "exclude_modules / modules_to_save leave none)")
        if lora.layers_to_transform is not None:
            why += f" (layers_to_transform {lora.layers_to_transform}"
            why += f", layers_pattern {lora.layers_pattern})" if lora.layers_pattern else ")"
        raise CheckpointError(f"{self.folder / ADAPTER_CONFIG}: peft refuses this adapter: {why}")
