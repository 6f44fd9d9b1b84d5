"""Reference decoder: the torch step functions (PipoStep, no ONNX) through PipoSession's
generation loop, the one loop every backend runs. It defines the tokens every other backend
must produce.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipo_graphs import SamplingParams
from pipo_graphs.contract import DEFAULT_SAMPLE_CAP
from pipo_graphs.semantics import SequenceOutput
from pipo_runtime.session import DEFAULT_MAX_STEPS, GenerationConfig, PipoSession

from pipo_export.model.modules import PipoModel
from pipo_export.model.steps import PipoStep
from pipo_export.model.torch_backend import TorchStepRunner, model_facts


@dataclass
class GenerateOptions:
    """One generation request (batch-wide settings)."""

    max_steps: int = DEFAULT_MAX_STEPS  # prefill + decode steps; each emits one pair
    threshold: float = -1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    seq_offset: int = 0  # sequence index of row 0 for the random numbers
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


class ReferenceDecoder:
    """Generates with the torch PipoStep (`self.step`, replaceable, e.g. by a RegularStep);
    `generate` takes token-id prompts of any lengths."""

    def __init__(self, model: PipoModel, sample_cap: int = DEFAULT_SAMPLE_CAP):
        self.model = model
        self.step = PipoStep(model, sample_cap=sample_cap)
        self.pad_id = model.config.pad_token_id

    def generate(self, prompts: list[list[int]], opts: GenerateOptions) -> list[SequenceOutput]:
        """prompts: B lists of token ids -> one SequenceOutput per prompt (EOS: only the ids
        in opts.eos_token_ids)."""
        facts = replace(model_facts(self.model.config), eos_ids=frozenset(opts.eos_token_ids))
        session = PipoSession(None, facts, TorchStepRunner(self.step, facts))
        config = GenerationConfig(max_steps=opts.max_steps, threshold=opts.threshold,
                                  sampling=opts.sampling, seed=opts.seed,
                                  seq_offset=opts.seq_offset,
                                  stop_token_ids=tuple(opts.stop_token_ids))
        return session.generate(prompts, config).sequences
