"""The library's exception types. Every message says what failed, where, and what to try."""


class OpdvizError(Exception):
    """Base class of every error opdviz raises on purpose (the CLI prints these without a traceback)."""


class CheckpointError(OpdvizError):
    """A checkpoint file or folder cannot be read as asked (bad path, format, header, index)."""


class TensorMismatchError(OpdvizError):
    """A tensor pair cannot be compared (shape/dtype mismatch, non-float, NaN/Inf)."""


class StoreError(OpdvizError):
    """The DuckDB store or its staging folder cannot be read or written."""


class OptionsError(OpdvizError):
    """Options given by the user are inconsistent or out of range."""


class DiskFullError(StoreError):
    """The disk (or quota) holding the store ran out of space; what was stored is kept and resumable."""


class MissingExtraError(OptionsError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install "opdviz[extra]"`` line."""
