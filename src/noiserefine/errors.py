"""The one exception type users see: a short message, no traceback, non-zero exit in the CLI."""


class NoiseRefineError(ValueError):
    """Bad input or state that the user can fix (wrong shape, unknown word, missing file...)."""
