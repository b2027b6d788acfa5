"""The errors this codebase raises on purpose, in one place: each carries a one-line message saying what
is wrong and what to do, and util/runtime/cli.py turns each into that line and an exit status."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what is allowed."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


class DataError(ValueError):
    """A problem with the data on disk (list file, image or label), with a message saying where."""


class EmptyListError(DataError):
    """A list file without a single entry (tool/train.py refuses it before a run starts)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops (the last saved checkpoint is kept)."""
