"""Logging set-up, with a filter that masks every known secret in every log line."""

from __future__ import annotations

import logging
import sys

from schemas.config import mask_secrets


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


def setup_logging(level: str = "INFO", path: str | None = None) -> None:
    """Log to stderr, or to the file ``path`` (appending), through the secret filter."""
    handler: logging.Handler = (
        logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SECRETS)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party loggers may format URLs or tracebacks: they pass through the same filter.
    for noisy in ("nats", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
