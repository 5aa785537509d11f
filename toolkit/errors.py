"""The toolkit's error hierarchy.

Every error a user can cause (a bad study file, a corrupt corpus, a store of the
wrong schema, a cluster that cannot take the job) is a :class:`ToolkitError`. The
CLI prints its message as one line and exits non-zero; anything else is a bug and
keeps its traceback. Messages say what was wrong, where (file, line, record,
field) and what to do.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class of every user-facing error."""


class ConfigError(ToolkitError):
    """A study file or command-line option is invalid."""


class CorpusError(ToolkitError):
    """A corpus file is missing, unreadable or malformed."""


class StoreError(ToolkitError):
    """A Zarr store is missing, incomplete or does not match its schema."""


class CheckpointError(ToolkitError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class SubmissionError(ToolkitError):
    """A job cannot be submitted or run on the chosen executor."""


class InputError(ToolkitError):
    """Data or a model handed to a library function is not what it computes on (a batch
    without labels, a model whose parameters fit no Fisher group): not a configuration error."""
