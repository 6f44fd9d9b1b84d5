"""pipo-export: deployment compiler for PIPO (Pair-In, Pair-Out) language models."""
import logging as _logging

# transformers announces its pure-torch fallbacks (causal_conv1d, fla) on first use; those
# fallbacks are exactly the reference implementation we want, so keep user output clean.
_logging.getLogger("transformers.integrations.hub_kernels").addFilter(
    lambda record: "falling back to its reference" not in record.getMessage())

from .checkpoint import load_checkpoint  # noqa: E402
from .config import CompressorType, PipoConfig  # noqa: E402
from .errors import CheckpointError, ExportError, PipoError  # noqa: E402
from .model import PipoModel  # noqa: E402

__all__ = ["load_checkpoint", "PipoModel", "PipoConfig", "CompressorType", "PipoError",
           "CheckpointError", "ExportError"]
