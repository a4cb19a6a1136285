"""The store's errors: whether to wait for the database or give the message up."""

from __future__ import annotations


class StoreError(Exception):
    """Root of the store's errors. Texts never contain the DSN password."""


class StoreUnavailable(StoreError, ConnectionError):
    """The database cannot be reached now (down, restarting, locked): try again later."""


class StoreClosed(StoreUnavailable):
    """The store was closed."""


class StoreConflict(StoreUnavailable):
    """A deadlock or lock wait timeout with another writer: retry the transaction at once."""


class StoreRefused(StoreError):
    """The database refused the statement itself: retrying the same data cannot help."""

    def __init__(self, message: str, *, missing_table: bool = False, schema: bool = False) -> None:
        super().__init__(message)
        self.missing_table = missing_table
        # A table or column is missing: the schema, not the data, is wrong.
        self.schema = schema or missing_table
