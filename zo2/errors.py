"""User-facing errors.

Every error a user can cause (bad config, missing file, empty data, a loss that keeps coming out NaN) is a
:class:`ZO2Error`: its message is one paragraph naming the problem and the fix. The command line prints it
without a traceback (unless ``--debug``) and exits with :attr:`ZO2Error.exit_code`.
"""

from __future__ import annotations

from pathlib import Path


class ZO2Error(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_code = 2


class ConfigError(ZO2Error):
    """A config key that does not exist, or a value that is impossible."""


class ModelError(ZO2Error):
    """A model path that is missing, unreadable or not a causal LM; an unsupported model family."""


class DataError(ZO2Error):
    """A dataset file that is missing, empty or malformed."""


class CheckpointError(ZO2Error):
    """A run folder, trajectory log or snapshot that is missing, corrupt or inconsistent."""


class NonFiniteLossError(ZO2Error):
    """The loss came out NaN/inf for too many steps in a row."""


class DivergedError(ZO2Error):
    """A finite loss jumped far past its recent average: an update blew the weights up."""


class ResourceError(ZO2Error):
    """The job does not fit in host or device memory."""


def write_failure(path: str | Path, exc: OSError, doing: str, kept: str) -> str:
    """One paragraph for a write the file system refused (a full disk, a read-only mount): what failed, in which
    folder, the free space there, that ``kept`` is intact, and what to do."""
    import shutil

    folder = Path(path).parent
    try:
        free = f"; {shutil.disk_usage(folder).free / 1e9:.2f} GB free there"
    except OSError:
        free = ""
    return (f"{exc.strerror or exc} while {doing} in {folder}{free}. {kept}: free space (or fix the folder) and "
            "resume the run.")
