"""Transitional: `Backend` moved to pipo_runtime.backends (the registry); import it from there
or from pipo_runtime. Remove once pipo_export/cli/parser.py imports it from pipo_runtime."""
from pipo_runtime.backends import Backend  # noqa: F401
