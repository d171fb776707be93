"""User-facing errors: the CLI prints their message and exits with code 2, without a traceback."""


class TailwiseError(Exception):
    """An error the user can fix (bad config, missing or corrupt data, diverged training)."""


class ConfigError(TailwiseError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(TailwiseError):
    """A dataset file is missing, corrupt or inconsistent."""


class TrainingError(TailwiseError):
    """Training cannot continue (e.g. the loss became NaN/inf)."""
