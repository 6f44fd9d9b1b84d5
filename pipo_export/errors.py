"""Exceptions for user errors. The CLI prints their message (no traceback) and exits 2."""


from pipo_graphs.errors import PipoUserError


class PipoError(PipoUserError):
    """Base class of every error a user can cause and fix (bad path, bad checkpoint, bad flag)."""


class CheckpointError(PipoError):
    """The checkpoint folder is missing, incomplete or not a PIPO checkpoint."""


class ExportError(PipoError):
    """An export could not be produced or verified."""
