"""The two errors the command line reports in one line, without a traceback (`--debug` shows it)."""


class UsageError(Exception):
    """A mistake in the command line, the YAML or the files they name (exit status 2)."""


class TrainingStopped(RuntimeError):
    """The run cannot go on, e.g. `max_skipped_steps` non-finite steps in a row (exit status 1)."""
