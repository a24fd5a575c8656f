"""One exception family. Library code raises these; only cli.py turns them into exit codes."""


class ContrastiveError(Exception):
    """Base of every error the tool reports to a user as one line (exit code 1)."""


class InputError(ContrastiveError):
    """A folder, file or image the user pointed at cannot be used."""


class ConfigError(ContrastiveError):
    """Options that cannot work together (batch vs devices, steps vs epochs, ...)."""


class CheckpointError(ContrastiveError):
    """A run directory is missing, incomplete, or would be overwritten."""


class TrainingInterrupted(ContrastiveError):
    """SIGINT/SIGTERM arrived: the step in flight finished and a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class TrainingDiverged(ContrastiveError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
