"""The one exception family for user errors, shared by compiler and runtimes."""


class PipoUserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad input). CLIs print it and exit 2."""


class ManifestError(PipoUserError):
    """The export folder's manifest is missing, malformed, from another contract, or its files
    do not match their checksums."""
