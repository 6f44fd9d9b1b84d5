"""The torch backend of pipo_runtime: pipo_export's reference step functions behind the
runtime's StepRunner contract. It lives in the compiler package so the runtime itself never
imports torch; pipo_runtime.backends registers it by module path.

It runs an export's source checkpoint (from the manifest) or a checkpoint folder itself
(RUNS_CHECKPOINTS: PipoSession.load takes a folder without manifest.json on this backend; a
PEFT adapter folder with `base`). ReferenceDecoder drives the same runner through PipoSession.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipo_graphs.contract import (CONFIDENCE, INPUT_IDS, LENGTHS, Mode, NEXT_TOKEN, PAIR, PAST,
    PRESENT, SAMPLING_INPUTS, UNIFORMS, state_specs)
from pipo_graphs.errors import PipoUserError
from pipo_graphs.shapes import pair_axes
from pipo_runtime.backends.base import RunnerOptions, StepRunner
from pipo_runtime.requests import ModelFacts

from pipo_export.export.io_spec import model_dims
from pipo_export.model.checkpoint import checkpoint_files, load_checkpoint
from pipo_export.model.regular import step_class
from pipo_export.model.steps import PipoStep

RUNS_CHECKPOINTS = True


def model_facts(config) -> ModelFacts:
    """A checkpoint's PipoConfig -> the facts PipoSession checks requests against."""
    return ModelFacts(config.pad_token_id, frozenset(config.eos_token_ids), config.vocab_size,
                      config.text.max_position_embeddings)


class TorchStepRunner(StepRunner):
    """A PipoStep (or RegularStep) behind the StepRunner contract: numpy in, numpy out."""

    name = "torch"

    def __init__(self, step: PipoStep, facts: ModelFacts | None = None):
        self.step = step
        self.own_facts = facts or model_facts(step.model.config)
        self.pair_axes = pair_axes({PRESENT + s.name: s.shape
                                    for s in state_specs(model_dims(step.model), mtp=step.mtp)})

    @staticmethod
    def _t(a) -> torch.Tensor:
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))

    def _keep(self, pair, conf, states):
        self.pair, self.conf, self.states_ = pair, conf, states
        return pair.numpy(), conf.numpy()

    def prefill(self, feeds):
        self.sp = {n: self._t(feeds[n]) for n, _ in SAMPLING_INPUTS}
        past = {k[len(PAST):]: self._t(v) for k, v in feeds.items() if k.startswith(PAST)}
        if past:  # numpy float states are float32; the step computes in the model's dtype
            dtype = next(self.step.parameters()).dtype
            past = {k: v.to(dtype) if v.is_floating_point() and not k.startswith("recurrent")
                    else v for k, v in past.items()}
        nxt = self._t(feeds[NEXT_TOKEN]) if NEXT_TOKEN in feeds else None
        with torch.no_grad():
            return self._keep(*self.step.prefill(self._t(feeds[INPUT_IDS]),
                                                 self._t(feeds[LENGTHS]), self.sp,
                                                 self._t(feeds[UNIFORMS]), past or None, nxt))

    def past(self):
        """The last step's states as torch tensors (no copy)."""
        return {PAST + k: v for k, v in self.states_.items()}

    def decode(self, uniforms):
        with torch.no_grad():
            return self._keep(*self.step.decode(self.pair, self.states_, self.sp,
                                                self._t(uniforms)))

    def outputs(self):
        out = {PAIR: self.pair.numpy(), CONFIDENCE: self.conf.numpy()}
        out.update({PRESENT + k: v.float().numpy() if v.is_floating_point() else v.numpy()
                    for k, v in self.states_.items()})
        return out

    def facts(self, facts: ModelFacts | None) -> ModelFacts:
        """An export's facts when there is a manifest, the checkpoint config's otherwise."""
        return facts or self.own_facts


def check_source_files(manifest, source, base, adapters=()) -> None:
    """The export's source checkpoint (and base, and the adapters stacked after `source`) still
    hold the files the export read, byte for byte (manifest export.source_files); PipoUserError
    naming the first that differs."""
    recorded = manifest.export.source_files
    if recorded is None:
        raise PipoUserError(f"this export records no checksums of its source {source}, so the "
                            "torch backend cannot tell it is the same checkpoint; re-export, or "
                            "run the checkpoint folder itself (RunnerOptions.checkpoint)")
    now = checkpoint_files(source, base, adapters)
    for name in sorted(set(now) | set(recorded)):
        entry = recorded.get(name)
        if entry is None or name not in now or (entry.sha256, entry.bytes) != (
                now[name]["sha256"], now[name]["bytes"]):
            what = "is new" if entry is None else "is gone" if name not in now else "changed"
            raise PipoUserError(f"{source}: {name} {what} since the export (the torch backend "
                                "runs the export's source checkpoint); re-export, or run the "
                                "checkpoint folder itself (RunnerOptions.checkpoint)")


def load(folder: Path, manifest, options: RunnerOptions) -> TorchStepRunner:
    """On an export: its source checkpoint (options.checkpoint overrides it), the export's mode
    and sample_cap. On a checkpoint folder (manifest None): the folder itself, in
    options.dtype, PIPO mode."""
    adapters = list(options.adapters)
    if manifest is None:
        source, base, mode, cap, dtype = folder, options.base, Mode.PIPO, None, options.dtype
    else:
        source = options.checkpoint or manifest.export.source
        base = options.base or (None if options.checkpoint else manifest.export.base)
        mode, cap, dtype = manifest.export.mode, manifest.export.sample_cap, "float32"
        if not options.checkpoint and manifest.export.adapters:  # the export's whole stack
            source, adapters = None, list(manifest.export.adapters)
        for path in [source] if source or not adapters else adapters:
            if not path or not Path(path).is_dir():
                raise PipoUserError(f"the torch backend needs the export's source checkpoint "
                                    f"({path} not found); pass its folder")
        if not options.checkpoint:
            stack = [source] if source else adapters
            check_source_files(manifest, stack[0], base, stack[1:])
    model = load_checkpoint(source, dtype=getattr(torch, dtype), base=base, adapters=adapters)
    step = step_class(mode)(model, **({"sample_cap": cap} if cap else {}))
    return TorchStepRunner(step)
