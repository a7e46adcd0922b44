"""The error types every layer may raise and every entry point reports as one line (exit status 2): a bad
setting or input (ConfigError), a file that is not a usable checkpoint (CheckpointError). Imports nothing."""


class ConfigError(ValueError):
    """An impossible or malformed setting; the message is one line naming the setting."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message is one line naming the file."""
