"""The torch side: checkpoint config and loading (plus PEFT adapters), the PIPO model on
transformers' Qwen3.5 modules, cached step functions, sampling, synthetic checkpoints."""
import logging as _logging

# transformers announces its pure-torch fallbacks (causal_conv1d, fla) on first use; those
# fallbacks are exactly the reference implementation we want, so keep user output clean.
_logging.getLogger("transformers.integrations.hub_kernels").addFilter(
    lambda record: "falling back to its reference" not in record.getMessage())
