"""pipo-export: deployment compiler for PIPO (Pair-In, Pair-Out) language models.

Importing the package is cheap and needs no torch: the torch side (`pipo_export.model`,
`pipo_export.export`) loads on first use, so `check` and `build` run where torch is absent.
"""
import importlib as _importlib

_LAZY = {"load_checkpoint": "pipo_export.model.checkpoint", "PipoModel": "pipo_export.model.modules",
         "PipoConfig": "pipo_export.model.config", "CompressorType": "pipo_export.model.config",
         "PipoError": "pipo_export.errors", "CheckpointError": "pipo_export.errors",
         "ExportError": "pipo_export.errors"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pipo_export' has no attribute {name!r}")
    return getattr(_importlib.import_module(_LAZY[name]), name)
