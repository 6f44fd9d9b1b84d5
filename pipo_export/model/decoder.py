"""Reference decoder: plain torch prefill + decode loop over PipoStep (no ONNX).

It defines the tokens every other backend must produce.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.errors import PipoUserError
from pipo_graphs.semantics import SequenceOutput, pack_prompts

from pipo_export.model.steps import MtpContext, PipoStep
from pipo_export.model.modules import PipoModel
from pipo_export.model.sampling import DEFAULT_SAMPLE_CAP, sampling_tensors


@dataclass
class GenerateOptions:
    """One generation request (batch-wide settings)."""

    max_steps: int = 16  # prefill + decode steps; each emits one pair
    threshold: float = -1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    seq_offset: int = 0  # sequence index of row 0 for the random numbers
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


class ReferenceDecoder:
    """Generates with the torch PipoStep; `generate` takes token-id prompts of any lengths."""

    def __init__(self, model: PipoModel, sample_cap: int = DEFAULT_SAMPLE_CAP,
                 mtp_context: MtpContext = MtpContext.FULL):
        self.model = model
        self.step = PipoStep(model, sample_cap=sample_cap, mtp_context=mtp_context)
        self.pad_id = model.config.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], opts: GenerateOptions) -> list[SequenceOutput]:
        """prompts: B lists of token ids -> one SequenceOutput per prompt."""
        if opts.max_steps < 1:
            raise PipoUserError("max_steps must be >= 1")
        opts.sampling.validate()
        vocab = self.model.config.vocab_size
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise PipoUserError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        ids, lengths = pack_prompts(prompts, self.pad_id)
        seqs = [opts.seq_offset + i for i in range(len(prompts))]
        sp = sampling_tensors(opts.sampling, len(prompts), opts.threshold)
        eos, stop = set(opts.eos_token_ids), set(opts.stop_token_ids)
        outs = [SequenceOutput() for _ in prompts]
        pair, conf, states = self.step.prefill(torch.from_numpy(ids), torch.from_numpy(lengths), sp,
                                               torch.from_numpy(step_uniforms(opts.seed, seqs, 0)))
        for step in range(opts.max_steps):
            if step:
                u = torch.from_numpy(step_uniforms(opts.seed, seqs, step))
                pair, conf, states = self.step.decode(pair, states, sp, u)
            pairs, confs = pair.numpy(), conf.numpy()
            for row, out in enumerate(outs):
                if not out.done:
                    out.add_pair(pairs[row], confs[row], self.pad_id, eos, stop)
            if all(o.done for o in outs):
                break
        for out in outs:
            out.finish_reason = out.finish_reason or "length"
        return outs
