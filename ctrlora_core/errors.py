"""Exception types raised by ctrlora_core."""


class CtrLoRAError(Exception):
    """Base class for every error ctrlora_core raises on bad input."""


class CheckpointError(CtrLoRAError, ValueError):
    """A model file is unreadable, of the wrong kind, or does not match the model.

    The message always names the file (when there is one) and says what was expected.
    """

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)
