"""The library's user-facing errors (target errors live with the target parsing in ``retrieval.py``)."""

from __future__ import annotations


class LibraryError(RuntimeError):
    """Base class of the store's user-facing errors."""


class EmptyLibraryError(LibraryError):
    """The library holds no prototypes, so nothing can be indexed or retrieved."""


class StaleIndexError(LibraryError):
    """The index was built for other Parquet content than the file on disk now."""


class MissingIndexError(LibraryError):
    """The library folder has no index yet."""


class UnknownLabelError(LibraryError, KeyError):
    """A filter names a label or event type that the library does not contain."""

    def __str__(self) -> str:
        return str(self.args[0])
