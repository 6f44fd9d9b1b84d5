"""The torch backend of pipo_runtime: pipo_export's reference step functions behind the runtime's
Engine contract. Lives in the compiler package so the runtime itself never imports torch;
PipoSession loads it by name only when Backend.TORCH is chosen."""
from __future__ import annotations

import numpy as np
import torch

from pipo_graphs.contract import PRESENT, SAMPLING_INPUTS, UNIFORMS
from pipo_runtime.backends.base import Engine

from pipo_export.model.checkpoint import load_checkpoint
from pipo_export.model.steps import MtpContext
from pipo_export.model.regular import step_class


class TorchEngine(Engine):
    """pipo_export's torch reference steps on the export's source checkpoint."""

    name = "torch"

    def __init__(self, checkpoint: str, mtp_context: str, sample_cap: int, mode: str = "pipo"):
        self.step = step_class(mode)(load_checkpoint(checkpoint), sample_cap=sample_cap,
                                           mtp_context=MtpContext(mtp_context))

    def _t(self, a):
        return torch.from_numpy(np.ascontiguousarray(a))

    def _keep(self, pair, conf, states):
        self.pair, self.conf, self.states = pair, conf, states
        return pair.numpy(), conf.numpy()

    def prefill(self, feeds):
        self.sp = {n: self._t(feeds[n]) for n, _ in SAMPLING_INPUTS}
        with torch.no_grad():
            return self._keep(*self.step.prefill(self._t(feeds["input_ids"]),
                                                 self._t(feeds["lengths"]), self.sp,
                                                 self._t(feeds[UNIFORMS])))

    def decode(self, uniforms):
        with torch.no_grad():
            return self._keep(*self.step.decode(self.pair, self.states, self.sp,
                                                self._t(uniforms)))

    def outputs(self):
        out = {"pair": self.pair.numpy(), "confidence": self.conf.numpy()}
        out.update({PRESENT + k: v.float().numpy() if v.is_floating_point() else v.numpy()
                    for k, v in self.states.items()})
        return out
