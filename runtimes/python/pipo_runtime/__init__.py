"""pipo_runtime: embeddable PIPO runtime (numpy + onnxruntime; never imports torch).

    from pipo_runtime import Backend, GenerationConfig, PipoSession, SamplingParams
    session = PipoSession.load("export/", backend=Backend.ONNXRUNTIME, threads=2)
    result = session.generate([[5, 17, 300]], GenerationConfig(max_new_tokens=32, threshold=0.5))
"""
from pipo_graphs import SamplingParams
from pipo_graphs.errors import PipoUserError

from pipo_runtime.backends import Backend
from pipo_runtime.backends.base import OrtOptimization, RunnerOptions, StepRunner
from pipo_runtime.requests import ModelFacts
from pipo_runtime.session import GenerationConfig, GenerationResult, GenerationStream, \
    PipoSession, SequenceResult, StreamEvent

__all__ = ["Backend", "GenerationConfig", "GenerationResult", "GenerationStream", "ModelFacts", "OrtOptimization",
           "PipoSession", "PipoUserError", "RunnerOptions", "SamplingParams", "SequenceResult",
           "StepRunner", "StreamEvent"]
