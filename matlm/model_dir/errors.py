"""The one error the model-dir package raises to its users."""


class CheckpointError(ValueError):
    """A missing, empty, mismatched or unreadable model dir or checkpoint."""
