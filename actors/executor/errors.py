"""The root of the executor's operation errors: every one carries a contract code and a
message, which is what a failed operation's ``ErrorInfo`` is made of.

Its own module so that cloudstack.py (CloudStackError) and operations.py (OperationFailed)
share it without importing each other for it.
"""

from __future__ import annotations

from schemas.common import ErrorCode


class OperationError(Exception):
    """An operation failed in the contract's terms: ``code`` (schemas.common.ErrorCode) and
    ``message`` (the text an operator reads; never a secret)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
