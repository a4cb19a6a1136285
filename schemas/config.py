"""The one typed settings object (contract §1): environment over TOML over defaults."""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

import msgspec
from msgspec import Meta, Struct

Seconds = Annotated[float, Meta(gt=0)]


class Settings(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything volumed reads from its environment, loaded once and passed down."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma-separated."""
    db_dsn: str = "mysql://root@127.0.0.1:3306/volumed"
    """mysql://user:password@host:port/database or sqlite:///path/file.db"""
    cloudstack_endpoint: str | None = None
    """Unset: the active ossea_configs row is read for each operation."""
    cloudstack_key: str | None = None
    cloudstack_secret: str | None = None
    vm_id: str | None = None
    """CloudStack id of the VM this host is. Unset: ossea_configs.oma_vm_id."""
    sysfs: str = "/sys"
    dev: str = "/dev"
    devices: tuple[str, ...] = ("vd*", "sd*", "xvd*", "nvme*n*")
    poll_interval: Seconds = 2.0
    correlation_timeout: Seconds = 30.0

    # Beyond the contract: tuning knobs with safe defaults.
    instance: str = ""
    """Name of this process in heartbeats and logs; default: host name + pid."""
    cloudstack_poll_interval: Seconds = 0.5
    """Longest wait between two queryAsyncJobResult calls (polling starts faster)."""
    cloudstack_job_timeout: Seconds = 900.0
    """A CloudStack job still running after this fails its operation explicitly."""
    cloudstack_timeout: Seconds = 30.0
    """HTTP timeout of one CloudStack request."""
    cloudstack_retries: Annotated[int, Meta(ge=0, le=20)] = 5
    """Retries of a transient CloudStack failure before cloudstack_unavailable."""
    cloudstack_retry_backoff: Seconds = 0.5
    """First retry delay; doubles each retry, capped at 30 s."""
    executor_concurrency: Annotated[int, Meta(ge=1, le=10000)] = 256
    """Commands one executor works on at once."""
    detach_timeout: Seconds = 30.0
    """Seconds a detach from the local VM waits for its device to go."""
    operation_retention: Seconds = 30 * 86_400.0
    """Seconds a finished operation's record is kept in the operations bucket (the database
    keeps the history): how late a re-sent operation id is still recognised."""
    heartbeat_interval: Seconds = 5.0
    """How often each actor refreshes its health heartbeat; three missed make it stale."""
    stream_replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    log_level: str = "INFO"

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.redacted().items())})"

    __str__ = __repr__

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked: the only form ever logged."""
        out = msgspec.structs.asdict(self)
        if out["cloudstack_secret"]:
            out["cloudstack_secret"] = "***"
        out["db_dsn"] = mask_url_password(self.db_dsn)
        out["nats_url"] = ",".join(mask_url_password(u) for u in self.nats_url.split(","))
        return out

    def secrets(self) -> list[str]:
        """Every secret value in these settings, for the log redaction filter."""
        found = [self.cloudstack_secret or ""]
        found += [url_password(u) or "" for u in [self.db_dsn, *self.nats_url.split(",")]]
        return [s for s in found if s]

    @property
    def instance_name(self) -> str:
        return self.instance or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# Keys whose environment variable has no VOLUMED_ prefix: the names the cs client reads.
_UNPREFIXED = {"cloudstack_endpoint", "cloudstack_key", "cloudstack_secret"}


def env_name(key: str) -> str:
    return key.upper() if key in _UNPREFIXED else f"VOLUMED_{key.upper()}"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and never its secret value."""


def load_settings(
    config_file: str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then the TOML file (keys in lower case without VOLUMED_), then environment."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                raw.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from None
    for key in Settings.__struct_fields__:
        value = environ.get(env_name(key))
        if value is not None and value != "":
            raw[key] = value
    if isinstance(raw.get("devices"), str):
        raw["devices"] = [p.strip() for p in raw["devices"].split(",") if p.strip()]
    try:
        # str_values lets "2" from the environment become a float; TOML values stay typed.
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        # The message names the field, never the value.
        raise ConfigError(f"invalid configuration: {e}") from None


def url_password(url: str) -> str | None:
    try:
        pw = urlsplit(url.strip()).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def mask_url_password(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        parts = urlsplit(url.strip())
        if parts.password is None:
            return url
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
