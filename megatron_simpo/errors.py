"""User-facing errors: each message names the flag, file/line or checkpoint and how to fix it.

The CLI prints these without a traceback and exits with ``exit_code`` (2 for mistakes in the
input; 1 for a run that failed while training).
"""


class SimPOError(Exception):
    """Base of the errors shown to users as one message."""

    exit_code = 2


class ConfigError(SimPOError, ValueError):
    """A configuration mistake; the message names the flag (or file key) and the fix."""


class DataError(SimPOError, ValueError):
    """Invalid input data; the message names the file, line, field and the fix."""


class CheckpointError(SimPOError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class TrainingError(SimPOError, RuntimeError):
    """The run cannot go on (too many non-finite updates, a failed collective); the message
    says what happened, what is intact and what to do."""

    exit_code = 1
