"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's config, command line or files: one line, no traceback."""


class ConfigError(UserError):
    """A config value that is of the wrong type, out of range or not a known option."""

    def __init__(self, key: str, value, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"{key}={value!r} is invalid: {valid}")


class DataError(UserError):
    """A data set that is missing, unreadable or does not fit the chosen models."""


class OutOfMemory(UserError):
    """An allocation failed: the device's memory is exhausted."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class StorageFault(UserError):
    """A file that could not be written or read where it lives: no space left, a
    read-only or forbidden folder, a file removed while the run used it."""
