"""Errors raised by the indexer, all with a message that names the file or index concerned."""

from __future__ import annotations


class IndexStoreError(Exception):
    """Base class: something is wrong with an on-disk index."""


class IndexNotFound(IndexStoreError, FileNotFoundError):
    """No index (no `CURRENT` file) in the given directory."""


class IndexCorrupt(IndexStoreError):
    """The index's files are missing, unreadable or inconsistent with each other."""


class ModelMismatch(IndexStoreError):
    """The index was built with a different model than the one offered."""


class IndexLocked(IndexStoreError):
    """Another process is writing to the index."""
