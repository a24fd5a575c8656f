"""One exception family. Library code raises these; only cli.py turns them into exit codes."""


class ContrastiveError(Exception):
    """Base of every error the tool reports to a user as one line (exit code 1)."""


class InputError(ContrastiveError):
    """A folder, file or image the user pointed at cannot be used."""


class ConfigError(ContrastiveError):
    """Options that cannot work together (batch vs devices, steps vs epochs, ...)."""


class CheckpointError(ContrastiveError):
    """A run directory is missing, incomplete, or would be overwritten."""
