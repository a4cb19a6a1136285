"""The executor's door to CloudStack: one request at a time, errors mapped to the contract.

Only this module knows the `cs` client and CloudStack's error shapes. It never retries a
mutation by itself: whether a retry is safe depends on the operation (see operations.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
from cs import AIOCloudStack, CloudStackApiException, CloudStackException

from actors.executor.errors import OperationError
from actors.metrics import CLOUDSTACK_CALLS, CLOUDSTACK_ERRORS, CLOUDSTACK_SECONDS
from schemas.common import ErrorCode
from schemas.config import url_host
from schemas.internal import CloudStackCredentials

log = logging.getLogger("volumed.executor.cloudstack")

# CloudStack's own async job states (queryAsyncJobResult.jobstatus).
JOB_PENDING, JOB_SUCCEEDED, JOB_FAILED = 0, 1, 2


class CloudStackError(OperationError):
    """A CloudStack failure in the contract's terms. ``transient`` ones may be retried."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        transient: bool = False,
        maybe_applied: bool = False,
        job_failed: bool = False,
    ) -> None:
        super().__init__(code, message)
        self.transient = transient
        # An async job ran and failed: nothing of this attempt is running any more.
        self.job_failed = job_failed
        # The request may have reached CloudStack (its answer was lost): look before resending.
        self.maybe_applied = maybe_applied


@dataclass(frozen=True)
class Job:
    job_id: str
    # createVolume answers with the new volume's id at once, before the job ends.
    volume_id: str | None = None


CredentialsSource = Callable[[], Awaitable[CloudStackCredentials]]

# How long a signed request stays valid, counted on CloudStack's clock (cs's default).
SIGNATURE_LIFETIME = 600.0


class CloudClock:
    """CloudStack's clock, as the ``Date`` header of its answers tells it.

    This host's clock may differ from CloudStack's by any amount: every time compared with
    CloudStack's (a signature's ``expires``, a volume's ``created``) is read from here. The
    offset is the latest answer's (1 s resolution); until one is seen, this host's clock."""

    def __init__(self) -> None:
        self.offset: float | None = None  # CloudStack's time - ours, at the latest answer

    def now(self) -> float:
        return time.time() + (self.offset or 0.0)

    def observe(self, date: str | None) -> None:
        try:
            at = parsedate_to_datetime(date).timestamp() if date else None
        except (TypeError, ValueError):
            at = None  # a proxy's odd header: keep what was known
        if at is not None:
            self.offset = at - time.time()

    def trace(self) -> aiohttp.TraceConfig:
        """Hooks an HTTP session so that each of its answers sets the clock."""

        async def on_request_end(
            _session: aiohttp.ClientSession, _ctx: SimpleNamespace, params: Any
        ) -> None:
            self.observe(params.response.headers.get("Date"))

        config = aiohttp.TraceConfig()
        config.on_request_end.append(on_request_end)
        return config


class CloudStack:
    """A CloudStack endpoint reached through `cs`'s async client, sharing one HTTP pool."""

    def __init__(self, credentials: CredentialsSource, *, timeout: float = 30.0) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._owner: CloudStack | None = None
        self.clock = CloudClock()
        # `cs` clients by credentials, shared by every view (see _client).
        self._clients: dict[tuple[str, str, str], AIOCloudStack] = {}

    def with_credentials(self, credentials: CloudStackCredentials) -> CloudStack:
        """A view that uses these credentials for every call (one operation's), sharing
        the HTTP pool."""
        view = CloudStack(_constant(credentials), timeout=self._timeout)
        view._session = self._http()
        view._owner = self
        view.clock = self.clock  # the shared session's answers set it
        return view

    async def close(self) -> None:
        if self._owner is not None:
            return  # the pool belongs to the gateway this view was made from
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(limit=64),
                trace_configs=[self.clock.trace()],
            )
        return self._session

    def _client(self, endpoint: str, key: str, secret: str) -> AIOCloudStack:
        """`cs`'s client for these credentials on the shared pool, made once and then
        reused (it keeps no state of a request): making one costs more CPU than a request
        (it builds a requests.Session it never uses)."""
        session = self._http()
        clients = (self._owner or self)._clients
        client = clients.get((endpoint, key, secret))
        if client is None or client.session is not session:
            if len(clients) >= 8:  # credentials changed several times: forget the old ones
                clients.clear()
            client = clients[(endpoint, key, secret)] = AIOCloudStack(
                # POST, never GET: aiohttp silently re-sends a GET whose kept-alive
                # connection broke, and CloudStack mutations are GETs too — that would
                # create twice.
                method="post",
                endpoint=endpoint,
                key=key,
                secret=secret,
                timeout=int(self._timeout),
                session=session,
                fetch_result=False,
            )
        return client

    async def call(self, command: str, **params: Any) -> Any:
        """Send one request; return its unwrapped answer or raise CloudStackError."""
        creds = await self._credentials()
        if creds.error or not (creds.endpoint and creds.key and creds.secret):
            raise CloudStackError(
                "unauthorized",
                "no CloudStack credentials: set CLOUDSTACK_ENDPOINT, CLOUDSTACK_KEY and "
                "CLOUDSTACK_SECRET, or activate a row of ossea_configs"
                + (f" ({creds.error})" if creds.error else ""),
            )
        client = self._client(creds.endpoint, creds.key, creds.secret)
        CLOUDSTACK_CALLS.labels(command).inc()
        started = time.perf_counter()
        try:
            expires = self.clock.now() + SIGNATURE_LIFETIME
            try:
                return await _send(client, creds, command, _expiring(params, expires))
            except CloudStackError as e:
                # CloudStack answers an expired signature as any bad one (401, "unable to
                # verify user credentials and/or request signature"): this one had expired
                # by the clock its very refusal taught us (the first request, before any
                # answer had).
                if e.code != "unauthorized" or expires >= self.clock.now():
                    raise
            # Sent again once: a request refused for its signature never ran (a read or a
            # mutation alike), so sending it again cannot repeat it.
            log.info("%s: signature expired on CloudStack's clock; signing it again", command)
            expires = self.clock.now() + SIGNATURE_LIFETIME
            return await _send(client, creds, command, _expiring(params, expires))
        except CloudStackError as e:
            CLOUDSTACK_ERRORS.labels(command, e.code).inc()
            raise
        finally:
            CLOUDSTACK_SECONDS.labels(command).observe(time.perf_counter() - started)

    async def start(self, command: str, **params: Any) -> Job:
        """Send an async command; return its job (never waits for it)."""
        answer = await self.call(command, **params)
        job_id = answer.get("jobid") if isinstance(answer, dict) else None
        if not job_id:
            raise CloudStackError("cloudstack_error", f"{command}: CloudStack returned no job id")
        return Job(job_id=str(job_id), volume_id=answer.get("id"))

    async def job_result(self, job_id: str) -> dict[str, Any] | None:
        """The job's result if it has ended (raising its error if it failed), else None."""
        answer = await self.call("queryAsyncJobResult", jobid=job_id)
        status = answer.get("jobstatus")
        if status == JOB_PENDING:
            return None
        result = answer.get("jobresult") or {}
        if status == JOB_SUCCEEDED and not answer.get("jobresultcode"):
            return result if isinstance(result, dict) else {}
        cmd = str(answer.get("cmd", "")).rsplit(".", 1)[-1] or "job"
        error = map_api_error(cmd, result, job=True)
        error.job_failed = True
        CLOUDSTACK_ERRORS.labels(_command_of(cmd), error.code).inc()
        raise error

    async def wait(self, job_id: str, *, max_interval: float, deadline: float) -> dict[str, Any]:
        """Poll a job until it ends. Starts fast (most jobs end in milliseconds in a quiet
        cloud, or in seconds in a real one) and backs off to ``max_interval``."""
        interval = 0.005
        while True:
            try:
                result = await self.job_result(job_id)
            except CloudStackError as e:
                if e.job_failed or not e.transient:
                    raise
                result = None  # polling is read-only: a lost answer is simply asked again
                log.debug("polling job %s: %s", job_id, e.message)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise CloudStackError(
                    "cloudstack_error",
                    f"CloudStack job {job_id} has not finished within the job timeout; "
                    "it may still finish later: check the volume in CloudStack",
                )
            await asyncio.sleep(interval)
            interval = min(interval * 2, max_interval)

    async def volume(self, volume_id: str) -> dict[str, Any] | None:
        """The volume as CloudStack has it now, or None if it does not exist."""
        try:
            answer = await self.call("listVolumes", id=volume_id, listall=True)
        except CloudStackError as e:
            if e.code == "not_found":
                return None
            raise
        volumes = answer.get("volume") or [] if isinstance(answer, dict) else []
        return volumes[0] if volumes else None

    async def volumes_named(self, name: str) -> list[dict[str, Any]]:
        answer = await self.call("listVolumes", name=name, listall=True)
        found = answer.get("volume") or [] if isinstance(answer, dict) else []
        # listVolumes matches names by substring: keep exact names only.
        return [v for v in found if v.get("name") == name]


_GUARDS: tuple[tuple[str, ErrorCode], ...] = (
    ("entity does not exist", "not_found"),
    ("unable to find", "not_found"),
    ("not attached to any vm", "conflict"),  # "Please specify a volume that is not attached…"
    ("not attached to a vm", "conflict"),  # "The specified volume is not attached to a VM."
    ("maximum number of data disks", "conflict"),
    ("already attached", "conflict"),
)


def map_api_error(command: str, error: Any, *, job: bool = False) -> CloudStackError:
    """CloudStack's {errorcode, cserrorcode, errortext} → the contract's error code."""
    error = error if isinstance(error, dict) else {}
    code = int(error.get("errorcode") or 0)
    text = str(error.get("errortext") or "no error text")
    what = f"{command}{' job' if job else ''} failed: {text} (CloudStack error {code})"
    lowered = text.lower()
    if code == 401:
        return CloudStackError(
            "unauthorized",
            f"CloudStack rejected the credentials of {command}: check the API key "
            "and secret (CLOUDSTACK_KEY/CLOUDSTACK_SECRET or the active ossea_configs row)",
        )
    for needle, mapped in _GUARDS:
        if needle in lowered:
            return CloudStackError(mapped, what)
    if code == 536:
        return CloudStackError("conflict", what)
    if code == 429 or (code == 530 and "internal error" in lowered) or code in (500, 502, 503, 504):
        # Transient: the job ended (or the request was refused), nothing is running.
        return CloudStackError("cloudstack_unavailable", what, transient=True)
    return CloudStackError("cloudstack_error", what)


async def _send(
    client: AIOCloudStack, creds: CloudStackCredentials, command: str, params: dict[str, Any]
) -> Any:
    """One request through `cs`, its failures as CloudStackError."""
    try:
        return await getattr(client, command)(**params)
    except CloudStackApiException as e:
        raise map_api_error(command, e.error) from None
    except CloudStackException as e:
        # Not an API answer (a proxy's HTML page, a timeout): the request may have passed.
        raise CloudStackError(
            "cloudstack_unavailable",
            f"{command}: CloudStack did not answer properly ({_first_arg(e)})",
            transient=True,
            maybe_applied=_is_mutation(command),
        ) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise CloudStackError(
            "cloudstack_unavailable",
            f"{command}: cannot reach CloudStack at {_endpoint_host(creds.endpoint)} "
            f"({type(e).__name__}{': ' + str(e) if str(e) else ''})",
            transient=True,
            maybe_applied=_is_mutation(command),
        ) from None


def _expiring(params: dict[str, Any], expires: float) -> dict[str, Any]:
    """``params`` signed to expire at ``expires`` (CloudStack's clock); cs then adds no
    ``expires`` of its own, which it would count from this host's clock."""
    at = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    return {**params, "signatureVersion": "3", "expires": at}


def _constant(credentials: CloudStackCredentials) -> CredentialsSource:
    async def source() -> CloudStackCredentials:
        return credentials

    return source


def _command_of(job_cmd: str) -> str:
    """The API command of a job's class name ("AttachVolumeCmd" → "attachVolume"), so that
    a failed job counts under the command that started it."""
    match = re.fullmatch(r"(\w+?)Cmd(ByAdmin)?", job_cmd)
    name = match[1] if match else job_cmd
    return name[:1].lower() + name[1:]


def _is_mutation(command: str) -> bool:
    return not command.startswith(("list", "query"))


def _first_arg(e: Exception) -> str:
    return str(e.args[0]) if e.args else type(e).__name__


def _endpoint_host(endpoint: str | None) -> str:
    # host[:port] only: an endpoint may carry user:password@, which no message may show.
    return url_host(endpoint or "")
