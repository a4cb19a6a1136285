"""The one typed settings object (contract §1): environment over TOML over defaults."""

from __future__ import annotations

import os
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import unquote

import msgspec
from msgspec import Meta, Struct

Seconds = Annotated[float, Meta(gt=0)]
# A glob of block device names; an empty one would match nothing (or, by accident, all).
DevicePattern = Annotated[str, Meta(min_length=1, pattern=r"\S")]
# host:port, host optional (":9464" listens on every address), IPv6 in brackets, port 0-65535.
_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
ListenAddress = Annotated[
    str,
    Meta(pattern=rf"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):{_PORT}$", description="host:port"),
]


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
    devices: Annotated[tuple[DevicePattern, ...], Meta(min_length=1)] = (
        "vd*",
        "sd*",
        "xvd*",
        "nvme*n*",
    )
    """At least one pattern: a watcher that watches nothing is a configuration error."""
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
    cloudstack_retry_budget: Seconds = 600.0
    """Seconds transient CloudStack failures are retried before cloudstack_unavailable
    (contract: at least 10 minutes by default; a management-server restart takes minutes)."""
    cloudstack_retry_backoff: Seconds = 0.5
    """Base of the retry delay: doubling per retry, capped, with full jitter."""
    cloudstack_retry_cap: Seconds = 30.0
    """Longest delay between two retries of a transient CloudStack failure."""
    executor_concurrency: Annotated[int, Meta(ge=1, le=10000)] = 256
    """Commands one executor works on at once."""
    detach_timeout: Seconds = 30.0
    """Seconds a detach from the local VM waits for its device to go."""
    operation_retention: Seconds = 30 * 86_400.0
    """Seconds a finished operation's record is kept in the operations bucket (the database
    keeps the history): how late a re-sent operation id is still recognised."""
    heartbeat_interval: Seconds = 5.0
    """How often each actor refreshes its health heartbeat; three missed make it stale."""
    query_wait: Annotated[float, Meta(ge=0)] = 2.0
    """Seconds a query waits for the database to hold every event published before it
    (the persistence consumer's ack floor); past it, it answers from the database as it
    is and logs so. 0: answer at once."""
    stream_replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    """json: one JSON object per line (for journald, Loki, ...); text: for people; auto:
    text when stderr is a terminal, json otherwise."""
    metrics_addr: ListenAddress | None = None
    """host:port of the Prometheus endpoint (/metrics); unset: none is served."""
    http_addr: ListenAddress | None = None
    """host:port of the REST gateway (the Go daemon's API, contract §7): set, `volumed run`
    also serves it; `volumed run gateway` serves it alone (on 127.0.0.1:8090 if unset)."""

    host_id: str = ""
    """Names this host's clock (see ``clock``). Unset: the kernel's boot id. Set it only to
    run several simulated hosts on one machine."""

    # NATS security (deploy/nats-accounts/, deploy/tls/): who this process is to NATS.
    nats_tls_ca: str | None = None
    """PEM file of the CA that signed the server's certificate; set: TLS is used (as with
    a tls:// URL), unset: the system's CAs verify a tls:// server."""
    nats_tls_cert: str | None = None
    """PEM file of this process's client certificate (a server with verify: true asks)."""
    nats_tls_key: str | None = None
    """PEM file of the client certificate's private key."""
    nats_user: str | None = None
    """NATS user name (a user of deploy/nats-accounts/, one per actor)."""
    nats_password: str | None = None
    """That user's password: a secret, never logged."""
    nats_creds: str | None = None
    """A .creds file (JWT and NKey seed) instead of user and password."""
    nats_inbox_prefix: str | None = None
    """Subject prefix of this process's reply inboxes (requests, JetStream API calls, pull
    consumers). Unset: ``inbox_prefix`` derives it from the user name."""
    nats_provision: bool = True
    """Create or update the streams, consumers and buckets at start. False for the
    least-privilege actor users, which may not: an admin provisions once (see
    docs/operations.md)."""

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.redacted().items())})"

    __str__ = __repr__

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked: the only form ever logged."""
        out = msgspec.structs.asdict(self)
        for key in ("cloudstack_secret", "nats_password"):
            if out[key]:
                out[key] = "***"
        out["db_dsn"] = mask_url_password(self.db_dsn)
        out["nats_url"] = ",".join(mask_url_password(u) for u in self.nats_url.split(","))
        if self.cloudstack_endpoint:
            out["cloudstack_endpoint"] = mask_url_password(self.cloudstack_endpoint)
        return out

    def secrets(self) -> list[str]:
        """Every secret value in these settings (URL passwords as written and decoded),
        for the log redaction filter."""
        found = [self.cloudstack_secret or "", self.nats_password or ""]
        for url in (self.db_dsn, self.cloudstack_endpoint or "", *self.nats_url.split(",")):
            found += url_secrets(url)
        return list(dict.fromkeys(s for s in found if s))

    @property
    def inbox_prefix(self) -> str:
        """``nats_inbox_prefix``, else ``_INBOX.<user>`` for a process that logs in as a user
        (``nats_user``, or the user in the first ``nats_url``), else NATS's ``_INBOX``.

        Derived from the user because deploy/nats-accounts/ grants each user subscribe on
        ``_INBOX.<user>.>`` only (no role reads another's replies): the name that picks the
        permissions picks the prefix, with nothing more to keep in step. A server whose
        accounts still grant ``_INBOX.>`` covers the derived prefix too."""
        if self.nats_inbox_prefix:
            return self.nats_inbox_prefix
        first_url = self.nats_url.split(",")[0]
        user = self.nats_user or unquote(split_url(first_url).user or "")
        return f"_INBOX.{user}" if user else "_INBOX"

    @property
    def clock(self) -> str:
        """Which clock this process's wall-clock times are on: processes of one boot of one
        host share it, so their times compare; times on another clock never do (the device
        correlator's windows, issue: several hosts)."""
        if self.host_id:
            return self.host_id
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return f.read().strip()
        except OSError:
            return os.uname().nodename

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
        # Empty entries are kept, so that "," or "vd*,,sd*" is refused rather than shrunk.
        raw["devices"] = [p.strip() for p in raw["devices"].split(",")]
    try:
        # str_values lets "2" from the environment become a float; TOML values stay typed.
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        # The message names the setting, never the value.
        raise ConfigError(f"invalid configuration: {_name_the_setting(str(e))}") from None
    return _check_nats_security(settings)


def _name_the_setting(error: str) -> str:
    """msgspec's "... - at `$.devices[0]`" with the environment variable's name in front."""
    m = re.search(r" - at `\$\.(\w+)", error)
    if m is None or m[1] not in Settings.__struct_fields__:
        return error
    if "matching regex" in error and m[1] in _PATTERN_WORDS:
        # The regex itself tells a person nothing ("localhost" lacks its port).
        return f"{env_name(m[1])} ({m[1]}): must be {_PATTERN_WORDS[m[1]]}"
    return f"{env_name(m[1])} ({m[1]}): {error}"


_LISTEN_WORDS = (
    "host:port, the port 0 to 65535 (':8090' listens on every address, '[::1]:8090' for IPv6)"
)
_PATTERN_WORDS = {"metrics_addr": _LISTEN_WORDS, "http_addr": _LISTEN_WORDS}


# A NATS subject without wildcards: tokens of anything but white space, '.', '*' and '>'.
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")

# The settings that say how to reach NATS and who to be there: all a client needs.
NATS_KEYS = tuple(key for key in Settings.__struct_fields__ if key.startswith("nats_"))


def load_nats_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The NATS settings (``NATS_KEYS``) from the environment, checked as ``load_settings``
    checks them; every other setting keeps its default. For clients (the `volumed` user
    commands): a variable of the daemon's that they never use cannot stop them."""
    environ = os.environ if environ is None else environ
    names = {env_name(key) for key in NATS_KEYS}
    return load_settings(environ={k: v for k, v in environ.items() if k in names})


def _check_nats_security(settings: Settings) -> Settings:
    """Settings that only make sense together: refused at start, not at the first connect."""
    if bool(settings.nats_tls_cert) != bool(settings.nats_tls_key):
        raise ConfigError(
            "invalid configuration: VOLUMED_NATS_TLS_CERT and VOLUMED_NATS_TLS_KEY go together"
        )
    if settings.nats_password and not settings.nats_user:
        raise ConfigError("invalid configuration: VOLUMED_NATS_PASSWORD needs VOLUMED_NATS_USER")
    if settings.nats_creds and settings.nats_user:
        raise ConfigError(
            "invalid configuration: VOLUMED_NATS_CREDS and VOLUMED_NATS_USER exclude each other"
        )
    if not _SUBJECT.fullmatch(settings.inbox_prefix):
        # A user name is no secret; it is named so that the fix is obvious.
        why = "" if settings.nats_inbox_prefix else " (made from the NATS user name)"
        raise ConfigError(
            f"invalid configuration: VOLUMED_NATS_INBOX_PREFIX: {settings.inbox_prefix!r}{why}"
            " is not a subject without wildcards; set VOLUMED_NATS_INBOX_PREFIX"
        )
    for key in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key", "nats_creds"):
        path = getattr(settings, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"invalid configuration: {env_name(key)}: cannot read {path}")
    return settings


# -- URLs with credentials: the one parser -----------------------------------------------


class UrlParts(NamedTuple):
    scheme: str
    user: str | None
    """As written (percent-encoded, if it was)."""
    password: str | None
    """As written; ``url_password`` decodes it."""
    host: str
    """host[:port], never the user information."""
    hostname: str
    port: str
    rest: str
    """The path, query and fragment."""


def split_url(url: str) -> UrlParts:
    """``scheme://[user[:password]@]host[:port][/path][?query]``.

    A password may hold any character unescaped, '#', '/', '?', ':' and '@' included: the
    user information runs to the *last* '@' (urllib would cut it at '#', '/' or '?', and
    then both connect to the wrong place and show the rest of the password). The price: an
    '@' in a path or query must be written %40.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    user = password = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        password = pw if colon else None
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    host, tail = rest[:end], rest[end:]
    if host.startswith("[") and "]" in host:  # an IPv6 literal
        hostname, _, after = host[1:].partition("]")
        port = after.removeprefix(":")
    else:
        hostname, _, port = host.partition(":")
    return UrlParts(scheme, user, password, host, hostname, port, tail)


def url_password(url: str) -> str | None:
    """The URL's password, percent-decoded, or None."""
    password = split_url(url).password
    return unquote(password) if password else None


def url_secrets(url: str) -> list[str]:
    """The URL's password in every form it may be printed in: as written and decoded."""
    password = split_url(url).password
    return list(dict.fromkeys((password, unquote(password)))) if password else []


def url_host(url: str) -> str:
    """host[:port] of the URL, for messages: never its user information."""
    return split_url(url).host or "?"


def mask_url_password(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = split_url(url)
    if parts.password is None:
        return url
    scheme = f"{parts.scheme}://" if parts.scheme else ""
    return f"{scheme}{parts.user}:***@{parts.host}{parts.rest}"


# scheme://user:password@ anywhere in a text; the password runs to the token's last '@'.
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):\S+@")


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret and every URL password in it replaced by ***.

    The safety net for texts built from other texts (exception messages, error texts
    from elsewhere): whatever form a secret took on the way, it does not get through."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and secret in text:
            text = text.replace(secret, "***")
    return _URL_CREDENTIALS.sub(r"\1:***@", text)
