"""pipo_graphs: the versioned graph contract shared by pipo_export and the runtimes."""
from .contract import (CONTRACT_VERSION, DECODE, PREFILL, ModelDims, SamplingParams, StateSpec,
                       state_specs)
from .rng import step_uniforms, uniform

__all__ = ["CONTRACT_VERSION", "PREFILL", "DECODE", "ModelDims", "SamplingParams", "StateSpec",
           "state_specs", "step_uniforms", "uniform"]
