"""Logging set-up: one line per event, as text or JSON, each carrying the actor and, where
known, the operation and volume it is about; a filter masks every known secret in both."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Literal

from schemas.config import mask_secrets

LogFormat = Literal["auto", "json", "text"]
# The ids a line is about, besides those a call passes with ``extra=``: set by ``bind`` in
# the task that works on them, so that every line of that task (and of the tasks it starts)
# names them, down to the bus and CloudStack layers that do not know them.
CONTEXT_FIELDS = ("actor", "operation_id", "volume_id")
# The actors' loggers are named volumed.<actor>[...] (actors.supervisor.ACTORS).
_ACTORS = frozenset({"persistence", "executor", "correlator", "watcher", "gateway"})
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "volumed_log_context", default=None
)


def bind(**ids: str | None) -> None:
    """Name what every later log line of the current task is about (``actor``,
    ``operation_id``, ``volume_id``); None leaves a name as it was."""
    _context.set((_context.get() or {}) | {k: v for k, v in ids.items() if v})


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record where the call did not pass them with ``extra=``;
    the actor falls back to the logger's name (``volumed.<actor>...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, bound.get(name))
        if record.actor is None:  # type: ignore[attr-defined]
            # Callbacks of the NATS client run outside the actors' tasks: their logger's
            # name says which actor they belong to.
            parts = record.name.split(".")
            named = len(parts) > 1 and parts[0] == "volumed" and parts[1] in _ACTORS
            record.actor = parts[1] if named else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339 UTC), level, actor, operation_id,
    volume_id, logger, message. The message is already masked (SecretFilter runs first)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
            "level": record.levelname,
            "actor": getattr(record, "actor", None),
            "operation_id": getattr(record, "operation_id", None),
            "volume_id": getattr(record, "volume_id", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For people: ``time LEVEL logger: message [op=... volume=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{short}={value}"
            for short, name in (("op", "operation_id"), ("volume", "volume_id"))
            if (value := getattr(record, name, None))
        ]
        return f"{text} [{' '.join(ids)}]" if ids else text


class SecretFilter(logging.Filter):
    """Replaces known secret values in log records by ***.

    Secrets reach volumed from the environment and, later, from ossea_configs rows; each is
    registered here when it is first read. Logging is process-wide, so this filter is too.
    A password in any URL in a line is masked even if it was never registered.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *secrets: str | None) -> None:
        for s in secrets:
            if s and len(s) >= 4:
                self._secrets.add(s)

    def mask(self, text: str) -> str:
        """``text`` without any registered secret or URL password."""
        return mask_secrets(text, self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        # Every record, even before any secret is registered: URL passwords are masked too.
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message or record.exc_info:
            record.msg, record.args = masked, None
            if record.exc_info:
                import traceback

                record.msg += "\n" + self.mask(
                    "".join(traceback.format_exception(*record.exc_info))
                )
                record.exc_info, record.exc_text = None, None
        return True


SECRETS = SecretFilter()


class RepeatFilter(logging.Filter):
    """One line for one cause: a line identical to one logged less than ``window`` seconds
    ago (same level and text, from any actor: NATS reconnect attempts every half second,
    say) is dropped; the next one let through after the window says how many were.

    Lines about an operation or a device name it, so they differ and all pass."""

    def __init__(self, window: float = 10.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}  # → (since, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        since, dropped = self._seen.get(key, (0.0, 0))
        if record.created - since < self.window:
            self._seen[key] = (since, dropped + 1)
            return False
        if len(self._seen) > 1000:  # forget what has not repeated lately
            horizon = record.created - self.window
            self._seen = {k: v for k, v in self._seen.items() if v[0] >= horizon}
        self._seen[key] = (record.created, 0)
        if dropped:
            record.msg, record.args = (
                f"{record.getMessage()} (and {dropped} more times in the last "
                f"{record.created - since:.0f} s)",
                None,
            )
        return True


def setup_logging(
    level: str = "INFO", path: str | None = None, log_format: LogFormat = "auto"
) -> None:
    """Log to stderr, or to the file ``path`` (appending), through the secret filter;
    ``auto``: text on a terminal, JSON otherwise (journald, a file, a log shipper)."""
    handler: logging.Handler = (
        logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    )
    if log_format == "auto":
        log_format = "text" if path is None and sys.stderr.isatty() else "json"
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(SECRETS)  # first: the filters after it see masked texts only
    handler.addFilter(ContextFilter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party loggers may format URLs or tracebacks: they pass through the same filter.
    for noisy in ("nats", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
