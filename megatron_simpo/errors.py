"""User-facing errors: each message names the flag, file/line or checkpoint and how to fix it.

The CLI prints these without a traceback and exits with status 2.
"""


class SimPOError(Exception):
    """Base of the errors shown to users as one message."""


class ConfigError(SimPOError, ValueError):
    """A configuration mistake; the message names the flag (or file key) and the fix."""


class DataError(SimPOError, ValueError):
    """Invalid input data; the message names the file, line, field and the fix."""


class CheckpointError(SimPOError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""
