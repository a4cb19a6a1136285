"""Who the executor is to CloudStack, and which VM this host is.

The credentials come from the environment, else the active ossea_configs row (asked of the
persistence actor for each operation, so that a changed row applies to the next operation
without a restart). The local VM id comes from VOLUMED_VM_ID, else the row's oma_vm_id,
whatever the credentials' source.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from actors.logs import SECRETS
from bus import Bus
from bus.tasks import Backoff
from bus.topology import CONFIG_SUBJECT
from schemas.config import Settings, url_secrets
from schemas.internal import CheckResult, CloudStackCredentials


class LocalIdentity:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        # The local VM id as last resolved, and why it is unknown while it is.
        self.vm_id: str | None = settings.vm_id
        self.vm_id_problem = ""

    async def credentials(self, wait: float = 0.0) -> CloudStackCredentials:
        """The credentials and the local VM id, as they are now. ``wait``: seconds to keep
        asking while the row cannot be read just now (no persistence actor answered, the
        database away): a blip of either is waited out, not an operation's `unauthorized`."""
        s = self.settings
        from_env = bool(s.cloudstack_endpoint and s.cloudstack_key and s.cloudstack_secret)
        if from_env and s.vm_id:
            return CloudStackCredentials(
                endpoint=s.cloudstack_endpoint,
                key=s.cloudstack_key,
                secret=s.cloudstack_secret,
                vm_id=s.vm_id,
            )
        deadline = time.monotonic() + wait
        backoff = Backoff(0.2, 5.0)
        while True:
            creds = await self._ask_row()
            if not creds.transient or time.monotonic() + backoff.delay > deadline:
                break
            await backoff.pause()
        row_error, creds.error = creds.error, None if from_env else creds.error
        # Environment values win over the row, key by key.
        creds.endpoint = s.cloudstack_endpoint or creds.endpoint
        creds.key = s.cloudstack_key or creds.key
        creds.secret = s.cloudstack_secret or creds.secret
        creds.vm_id = s.vm_id or creds.vm_id
        # The row's endpoint may carry a password too (http://user:password@host/...).
        SECRETS.add(creds.secret, *url_secrets(creds.endpoint or ""))
        self.vm_id = creds.vm_id
        self.vm_id_problem = (
            ""
            if creds.vm_id
            else "VOLUMED_VM_ID is unset and "
            + (row_error or "the active ossea_configs row has no oma_vm_id")
        )
        return creds

    async def _ask_row(self) -> CloudStackCredentials:
        try:
            data = await self.bus.request(CONFIG_SUBJECT, b"{}", timeout=5.0)
            return msgspec.json.decode(data, type=CloudStackCredentials)
        except Exception as e:
            return CloudStackCredentials(
                error="the persistence actor did not answer for ossea_configs "
                f"({type(e).__name__})",
                transient=True,
            )

    async def resolve_vm_id(self, wait: float) -> str | None:
        """The local VM id, asking ossea_configs again for up to ``wait`` seconds while it
        is unknown."""
        deadline = time.monotonic() + wait
        while self.vm_id is None and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
            await self.credentials()
        return self.vm_id

    def check(self) -> CheckResult:
        """Which VM this host is: attaches to it need the id to find their devices."""
        if self.vm_id is None:
            return CheckResult(
                status="down",
                detail=f"unknown, attaches wait for it and then fail: {self.vm_id_problem}",
            )
        source = "VOLUMED_VM_ID" if self.settings.vm_id else "ossea_configs.oma_vm_id"
        return CheckResult(status="ok", detail=f"{self.vm_id} ({source})")
