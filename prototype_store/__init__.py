"""The prototype library (paper §3.2): Parquet rows, a FAISS index, and Eq. 3 retrieval.

Importing this package never imports Ray; the Ray job that fills the Parquet is
``pipelines/prototypes.py``.
"""

from prototype_store.errors import (
    EmptyLibraryError,
    LibraryError,
    MissingIndexError,
    StaleIndexError,
    UnknownLabelError,
)
from prototype_store.index import build_index
from prototype_store.retrieval import TargetError, UnknownChannelError
from prototype_store.store import Match, PrototypeStore
from prototype_store.table import write_prototypes

__all__ = [
    "EmptyLibraryError",
    "LibraryError",
    "Match",
    "MissingIndexError",
    "PrototypeStore",
    "StaleIndexError",
    "TargetError",
    "UnknownChannelError",
    "UnknownLabelError",
    "build_index",
    "write_prototypes",
]
