"""The store's errors. Every one of them is the database's: an event waits for it.

Whether an event *alone* can never be written is decided before it reaches the database
(records.decode_event, proofs.check_writable): what passes them fits every column. So a
statement that fails anyway fails for a reason every event would meet (the connection,
privileges, a read-only or full database, a table of another shape, lock waits), and the
event is kept for later, never dead-lettered.
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of the store's errors. Texts never contain the DSN password."""


class StoreUnavailable(StoreError, ConnectionError):
    """The database does not take the statement now: wait and try again."""


class StoreClosed(StoreUnavailable):
    """The store was closed."""


class StoreConflict(StoreUnavailable):
    """A deadlock or lock wait timeout with another writer: retry the transaction at once."""


class StoreRefused(StoreUnavailable):
    """The database answered and refused the statement (privileges, read-only, a full disk,
    a missing table or column, a NOT NULL column volumed does not fill): it waits for an
    operator, who can read the cause in the health answer."""

    def __init__(self, message: str, *, missing_table: bool = False, schema: bool = False) -> None:
        super().__init__(message)
        self.missing_table = missing_table
        # A table or column is missing: the schema, not the data, is wrong.
        self.schema = schema or missing_table
