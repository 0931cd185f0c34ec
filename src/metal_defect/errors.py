"""Errors a user can act on.

The CLI turns each of these into one readable line and a non-zero exit code; the
traceback goes to the log file only. Anything else is a bug and is reported as such.
"""


class MetalDefectError(Exception):
    """Base class: something the user can fix (bad config, missing data, no model)."""

    exit_code = 1


class ConfigError(MetalDefectError):
    """A configuration file or command-line override is missing, unknown or invalid."""

    exit_code = 2


class DataError(MetalDefectError):
    """The data source is missing, unreadable, unsafe or does not match the schema."""

    exit_code = 3


class ArtifactError(MetalDefectError):
    """An artifact (run, stage output, served model) is missing or inconsistent."""

    exit_code = 4
