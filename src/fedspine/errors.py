"""Typed errors that the CLI turns into clear messages and non-zero exit codes."""


class FedspineError(Exception):
    """Base class of every error fedspine raises on purpose."""


class ConfigError(FedspineError):
    """A configuration value is unknown, of the wrong type, or out of range.

    The message always names the offending key (dotted path) and what is allowed.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"config error at '{key}': {message}")


class DataError(FedspineError):
    """A dataset source is missing, empty or malformed."""


class ModelError(FedspineError):
    """A model directory is missing, corrupt or not a causal LM."""


class FleetError(FedspineError):
    """The fleet cannot run the experiment (e.g. no device can hold the model)."""


class DeployError(FedspineError):
    """A deployment cannot start or a message between server and device is malformed."""


class CheckpointError(FedspineError):
    """A checkpoint is missing, torn or does not belong to the run being resumed."""


class RunDirectoryError(FedspineError):
    """A run directory cannot be used: another process holds it, or it cannot be created."""


class RunFailedError(FedspineError):
    """A run finished without doing what a run is for (e.g. no update was aggregated)."""
