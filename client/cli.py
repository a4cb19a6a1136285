"""The `volumed` user commands, on the client: send a command and follow it to its end,
watch events, run the queries.

For a person each command shows its progress live (a spinner, a line per event, the device
at the end); with ``--json`` it prints one JSON object per line instead (each event as it
arrives, or the query's reply) for scripts. Exit codes: 0 completed (or found, or healthy),
1 failed, rejected or cancelled (the code is in the output; also an unknown id, an unhealthy
volumed), 2 a usage error, 3 no server or no volumed there (or its database not open), or a
timeout, 4 NATS refused the login (user, password, creds file, certificate) or a subject.

It reaches NATS as the daemon does, from the same VOLUMED_NATS_* variables (URL, TLS files,
user and password or creds file, inbox prefix); a flag replaces its variable. The password
has no flag (every local user can read a command line): VOLUMED_NATS_PASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Mapping as StrMapping
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from client.client import DEFAULT_SERVER, Client, Progress
from client.errors import (
    BadRequest,
    NotFound,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from schemas.commands import (
    AttachCommand,
    CancelCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DetachCommand,
    ResizeCommand,
)
from schemas.common import GIB, OP_TYPES, TERMINAL
from schemas.config import ConfigError, Settings, env_name, load_nats_settings
from schemas.events import OperationEvent
from schemas.queries import Health, Mapping, Operation

OK, FAILED, USAGE, UNAVAILABLE, UNAUTHORIZED = 0, 1, 2, 3, 4
INTERRUPTED = 130  # the shell's code for a command ended by SIGINT

COMMANDS = (
    *OP_TYPES,  # one sub-command per operation type
    "status",
    "list",
    "mapping",
    "vm-volumes",
    "watch",
    "health",
)

Handler = Callable[[Client, argparse.Namespace, "Output"], Awaitable[int]]


# -- output -------------------------------------------------------------------------------------


class Output:
    """Where a command's results go: rich text for a person, or JSON lines for a script."""

    def __init__(self, json: bool) -> None:
        self.json = json
        # Piped to a pager or a file, a line may be as long as it needs: an id cut short
        # to fit 80 columns would be useless to copy.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 1000)
        self.errors = Console(stderr=True, highlight=False)

    def line(self, value: Any) -> None:
        """One JSON object on a line of its own, written at once (a reader may be waiting)."""
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
        sys.stdout.flush()

    def event(self, event: OperationEvent, *, with_operation: bool = False) -> None:
        if self.json:
            self.line(event)
            return
        who = f"{event.operation_id}  {event.type:<6}  " if with_operation else ""
        time = (event.at or "")[11:19]
        self.console.print(
            f"[dim]{time}[/]  {who}{_styled(event.status)}  {_detail(event)}".rstrip(),
            soft_wrap=True,
        )

    def error(self, code: str, message: str) -> None:
        if self.json:
            self.line({"error": {"code": code, "message": message}})
        else:
            self.errors.print(f"[red]volumed: {code}:[/] {message}", soft_wrap=True)


_STYLES = {
    "pending": "yellow",
    "executing": "cyan",
    "completed": "bold green",
    "failed": "bold red",
    "rejected": "bold red",
    "cancelled": "bold magenta",
}


def _styled(status: str) -> str:
    return f"[{_STYLES.get(status, '')}]{status:<9}[/]"


def _detail(event: OperationEvent | Operation) -> str:
    """What a person wants to know about an event beyond its status."""
    if event.error is not None:
        error = event.error
        code, message = (
            (error["code"], error["message"])
            if isinstance(error, dict)
            else (error.code, error.message)
        )
        return f"[red]{code}[/]: {message}"
    if event.status == "cancelled" and event.target:
        return f"volume {event.volume_id}: cancelled by operation {event.target}"
    if event.status != "completed":
        return f"volume {event.volume_id}" if event.volume_id else ""
    if event.type == "resize" and isinstance(event, OperationEvent):
        device = f" ({event.device_path} shows it)" if event.device_path else ""
        return f"volume {event.volume_id} resized to {_size(event.size)}{device}"
    if event.device_path:
        by_id = f"  ({event.by_id_path})" if event.by_id_path else ""
        return f"volume {event.volume_id} is [bold]{event.device_path}[/]{by_id}"
    done = {
        "create": f"created volume {event.volume_id}",
        "attach": f"volume {event.volume_id} attached to VM {event.vm_id}",
        "detach": f"volume {event.volume_id} detached from VM {event.vm_id}",
        "delete": f"volume {event.volume_id} deleted",
        "cancel": f"cancelled {event.target}",
        "resize": f"volume {event.volume_id} resized",
    }
    return done.get(event.type, "")


def _table(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """The rows under their columns, leaving out a column that is empty in every row."""
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    names = list(columns)
    kept = [i for i in range(len(names)) if not cells or any(row[i] for row in cells)]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for i in kept:
        table.add_column(names[i], overflow="fold")  # folded, never cut: ids are copied
    for row in cells:
        table.add_row(*(row[i] for i in kept))
    return table


def _fields(rows: Iterable[tuple[str, Any]]) -> Table:
    """One record, a field per line (the fields that have a value)."""
    return _table(("", ""), (row for row in rows if row[1] is not None))


# -- commands -----------------------------------------------------------------------------------


async def follow(progress: Progress, out: Output, title: str, timeout: float | None) -> int:
    """Show an operation's events until its terminal one; its exit code."""
    try:
        async with asyncio.timeout(timeout):
            if out.json or not out.console.is_terminal:
                async for event in progress:
                    out.event(event)
            else:
                with out.console.status(f"{title}: waiting for volumed") as spinner:
                    async for event in progress:
                        out.event(event)
                        spinner.update(f"{title}: {event.status}")
    except asyncio.CancelledError:  # Ctrl-C: only this program stops, not the operation
        out.errors.print(
            f"stopped following {progress.operation_id}; it goes on "
            f"(`volumed watch {progress.operation_id}` follows it again)"
        )
        raise
    except TimeoutError:
        status = progress.last.status if progress.last else "not seen yet"
        raise Timeout(
            f"operation {progress.operation_id} did not end within {timeout} s "
            f"(it is {status}; `volumed watch {progress.operation_id}` follows it)"
        ) from None
    assert progress.last is not None
    return OK if progress.last.status == "completed" else FAILED


async def send(client: Client, args: argparse.Namespace, out: Output) -> int:
    command: Command = args.make(args)
    async with await client.send(command) as progress:
        return await follow(progress, out, f"{args.command} {progress.operation_id}", args.timeout)


async def watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.operation_id:
        async with await client.follow(args.operation_id) as progress:
            return await follow(progress, out, f"watch {args.operation_id}", args.timeout)
    async with await client.events() as events:
        out.errors.print("watching every operation's events (Ctrl-C to stop)")
        gaps = 0
        async for event in events:
            if events.gaps != gaps:
                gaps = events.gaps
                out.errors.print(
                    "[yellow]the connection to NATS was lost: events published meanwhile are "
                    "not shown (`volumed list` has every operation)[/]"
                )
            out.event(event, with_operation=True)
    return OK


async def status(client: Client, args: argparse.Namespace, out: Output) -> int:
    record = await client.operation(args.operation_id)
    if out.json:
        out.line(record)
    else:
        rows = [
            ("operation", record.operation_id),
            ("type", record.type),
            ("status", _styled(record.status)),
            ("volume", record.volume_id),
            ("vm", record.vm_id),
            ("device", record.device_path),
            ("by-id", record.by_id_path),
            ("cancelled by" if record.status == "cancelled" else "target", record.target),
            ("created", record.created_at),
            ("updated", record.updated_at),
            ("completed", record.completed_at),
        ]
        if record.error:
            rows.append(("error", _detail(record)))
        out.console.print(_fields(rows))
    return FAILED if record.status in TERMINAL and record.status != "completed" else OK


async def list_operations(client: Client, args: argparse.Namespace, out: Output) -> int:
    operations = await client.operations(
        type=args.type, status=args.status, volume_id=args.volume, vm_id=args.vm, limit=args.limit
    )
    if out.json:
        out.line({"operations": operations})
    else:
        out.console.print(
            _table(
                ("operation", "type", "status", "volume", "vm", "device", "error", "updated (UTC)"),
                (
                    (
                        o.operation_id,
                        o.type,
                        _styled(o.status),
                        o.volume_id,
                        o.vm_id,
                        o.device_path,
                        o.error and o.error.get("code"),
                        _when(o.updated_at),
                    )
                    for o in operations
                ),
            )
        )
    return OK


def _device(mapping: Mapping) -> str | None:
    """The mapping's device, or why it names none."""
    if mapping.device_path is None and mapping.proof_reason:
        return f"none: {mapping.proof_reason}"
    return mapping.device_path


def _mappings(mappings: Iterable[Mapping]) -> Table:
    return _table(
        ("volume", "vm", "device", "by-id", "size", "proof", "attach"),
        (
            (
                m.volume_id,
                m.vm_id,
                _device(m),
                m.by_id_path,
                _size(m.size),
                m.proof,
                m.operation_id,
            )
            for m in mappings
        ),
    )


async def mapping(client: Client, args: argparse.Namespace, out: Output) -> int:
    found = await client.mapping(volume_id=args.volume, device_path=args.device)
    if out.json:
        out.line(found)
    else:
        out.console.print(
            _fields(
                [
                    ("volume", found.volume_id),
                    ("vm", found.vm_id),
                    ("device", _device(found)),
                    ("by-id", found.by_id_path),
                    ("size", _size(found.size)),
                    ("proof", found.proof),
                    ("proven", found.proven_at),
                    ("attach", found.operation_id),
                    ("synced", found.last_sync),
                ]
            )
        )
    return OK


async def vm_volumes(client: Client, args: argparse.Namespace, out: Output) -> int:
    volumes = await client.vm_volumes(args.vm_id)
    if out.json:
        out.line({"volumes": volumes})
    else:
        out.console.print(_mappings(volumes))
    return OK


async def health(client: Client, args: argparse.Namespace, out: Output) -> int:
    report: Health = await client.health()
    if out.json:
        out.line(report)
    else:
        out.console.print(f"volumed is {_health_styled(report.status)}")
        out.console.print(
            _table(
                ("check", "status", "detail"),
                ((n, _health_styled(c.status), c.detail) for n, c in report.checks.items()),
            )
        )
    return OK if report.status == "ok" else FAILED


def _health_styled(status: str) -> str:
    style = {"ok": "green", "degraded": "yellow", "down": "red"}.get(status, "")
    return f"[{style}]{status}[/]"


def _when(timestamp: str | None) -> str | None:
    """An RFC 3339 UTC timestamp to the second, as a person reads it."""
    return timestamp and timestamp[:19].replace("T", " ")


def _size(size: int | None) -> str | None:
    if size is None:
        return None
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size} B"


# -- arguments ----------------------------------------------------------------------------------


_SIZE = re.compile(r"^(?P<number>\d+)\s*(?P<unit>[gGtT](i?[bB])?)?$")


def parse_size(text: str) -> int:
    """Bytes from ``10G``/``10GiB`` (GiB), ``1T``/``1TiB`` (TiB) or a number of bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a whole number of GiB (10G, 10GiB, 1TiB) or of bytes"
        )
    unit = (m["unit"] or "")[:1].upper()
    return int(m["number"]) * {"": 1, "G": GIB, "T": 1024 * GIB}[unit]


def parse_metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: KEY=VALUE expected")
    return key, value


# The CLI flags of the NATS settings beside --server; each replaces its variable.
_NATS_FLAGS = (
    ("--tls-ca", "nats_tls_ca", "PEM file of the CA of the server's certificate"),
    ("--tls-cert", "nats_tls_cert", "PEM file of this client's certificate"),
    ("--tls-key", "nats_tls_key", "PEM file of its private key"),
    ("--user", "nats_user", "NATS user; its password: $VOLUMED_NATS_PASSWORD"),
    ("--creds", "nats_creds", "NATS .creds file, instead of a user"),
    ("--inbox-prefix", "nats_inbox_prefix", "subject prefix of the replies (default: _INBOX.USER)"),
)


def nats_settings(
    args: argparse.Namespace, environ: StrMapping[str, str] | None = None
) -> Settings:
    """The NATS settings of the environment (as the daemon reads them), with the flags given
    in their place. Raises ConfigError (its text names the setting, never a secret)."""
    environ = dict(os.environ if environ is None else environ)
    for key in ("nats_url", *(key for _, key, _ in _NATS_FLAGS)):
        value = getattr(args, key, None)
        if value:
            environ[env_name(key)] = value
    return load_nats_settings(environ)


def add_commands(sub: Any) -> None:
    """Add the user commands to ``sub`` (the subparsers of the `volumed` parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        metavar="URL",
        dest="nats_url",
        help=f"NATS URL(s), comma-separated (default: $VOLUMED_NATS_URL or {DEFAULT_SERVER})",
    )
    for flag, key, what in _NATS_FLAGS:
        common.add_argument(
            flag, dest=key, metavar=flag.split("-")[-1].upper(), help=f"{what} (${env_name(key)})"
        )
    common.add_argument("--json", action="store_true", help="one JSON object per line, for scripts")
    common.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up (exit 3) when no server answers within this (default: %(default)s)",
    )
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop waiting (exit 3) when the operation has not ended by then; it goes on",
    )
    sends = argparse.ArgumentParser(add_help=False, parents=[common, waits])
    sends.add_argument(
        "--op",
        dest="operation_id",
        metavar="ID",
        help="the operation id (default: a new one); the same id again does nothing new",
    )

    def command(name: str, handler: Handler, help: str, *parents: argparse.ArgumentParser) -> Any:
        parser = sub.add_parser(name, help=help, description=help, parents=list(parents))
        parser.set_defaults(handler=handler)
        return parser

    create = command("create", send, "create a volume", sends)
    create.add_argument("name", help="the volume's name")
    create.add_argument("--size", required=True, type=parse_size, help="10G, 10GiB, 1TiB, bytes")
    create.add_argument("--offering", required=True, metavar="ID", help="disk offering id")
    create.add_argument("--zone", required=True, metavar="ID", help="zone id")
    create.add_argument(
        "--metadata",
        action="append",
        type=parse_metadata,
        metavar="KEY=VALUE",
        help="a tag for the volume (repeatable)",
    )
    create.set_defaults(
        make=lambda a: CreateCommand(
            operation_id=a.operation_id,
            name=a.name,
            size=a.size,
            disk_offering_id=a.offering,
            zone_id=a.zone,
            metadata=dict(a.metadata) if a.metadata else None,
        )
    )

    attach = command("attach", send, "attach a volume to a VM; shows the local device", sends)
    attach.add_argument("volume_id")
    attach.add_argument("vm_id")
    attach.add_argument("--root", action="store_true", help="attach as the root disk")
    attach.set_defaults(
        make=lambda a: AttachCommand(
            operation_id=a.operation_id, volume_id=a.volume_id, vm_id=a.vm_id, as_root=a.root
        )
    )
    detach = command("detach", send, "detach a volume from its VM", sends)
    detach.add_argument("volume_id")
    detach.set_defaults(
        make=lambda a: DetachCommand(operation_id=a.operation_id, volume_id=a.volume_id)
    )
    delete = command("delete", send, "delete a volume (detached first when attached)", sends)
    delete.add_argument("volume_id")
    delete.set_defaults(
        make=lambda a: DeleteCommand(operation_id=a.operation_id, volume_id=a.volume_id)
    )
    cancel = command("cancel", send, "cancel an operation that has not started", sends)
    cancel.add_argument("target", metavar="OPERATION", help="the operation to cancel")
    cancel.set_defaults(make=lambda a: CancelCommand(operation_id=a.operation_id, target=a.target))

    resize = command(
        "resize",
        send,
        "resize a volume; a local device is waited for until it shows the new size",
        sends,
    )
    resize.add_argument("volume_id")
    resize.add_argument("size", type=parse_size, help="the new size: 20G, 20GiB, 1TiB, bytes")
    resize.add_argument(
        "--shrink-ok", action="store_true", help="allow a smaller size (data beyond it is lost)"
    )
    resize.set_defaults(
        make=lambda a: ResizeCommand(
            operation_id=a.operation_id, volume_id=a.volume_id, size=a.size, shrink_ok=a.shrink_ok
        )
    )

    command("status", status, "show an operation", common).add_argument(
        "operation_id", metavar="OPERATION"
    )
    listing = command("list", list_operations, "list operations, newest first", common)
    listing.add_argument("--type", choices=OP_TYPES)
    listing.add_argument(
        "--status",
        choices=["pending", "executing", "completed", "failed", "cancelled", "rejected"],
    )
    listing.add_argument("--volume", metavar="ID")
    listing.add_argument("--vm", metavar="ID")
    listing.add_argument("--limit", type=int, default=20, help="at most (default: %(default)s)")

    mapped = command("mapping", mapping, "the device of an attached volume, or the reverse", common)
    which = mapped.add_mutually_exclusive_group(required=True)
    which.add_argument("--volume", metavar="ID")
    which.add_argument("--device", metavar="PATH")
    command("vm-volumes", vm_volumes, "the volumes attached to a VM", common).add_argument("vm_id")
    follow_one = command(
        "watch",
        watch,
        "follow one operation to its end, or every operation's events",
        common,
        waits,
    )
    follow_one.add_argument("operation_id", nargs="?", metavar="OPERATION")
    command("health", health, "volumed's health checks (exit 1 unless ok)", common)


def run(args: argparse.Namespace) -> int:
    """Run a parsed user command; its exit code."""
    # The bus logs its retries and NATS errors; a person sees the outcome instead.
    logging.getLogger().addHandler(logging.NullHandler())
    out = Output(args.json)
    try:
        return asyncio.run(_run(args, out))
    except KeyboardInterrupt:
        return OK if args.command == "watch" and not args.operation_id else INTERRUPTED


async def _run(args: argparse.Namespace, out: Output) -> int:
    handler: Handler = args.handler
    try:
        connecting = Client.connect(settings=nats_settings(args), timeout=args.connect_timeout)
        async with await connecting as client:
            return await handler(client, args, out)
    except ConfigError as e:  # a NATS setting, or a TLS file that is no PEM
        out.error("invalid_request", str(e))
        return USAGE
    except Unauthorized as e:
        out.error("unauthorized", str(e))
        return UNAUTHORIZED
    except (Unavailable, Timeout) as e:
        out.error("unavailable" if isinstance(e, Unavailable) else "timeout", str(e))
        return UNAVAILABLE
    except NotFound as e:
        out.error("not_found", str(e))
        return FAILED
    except BadRequest as e:
        out.error("invalid_request", str(e))
        return USAGE
    except ServiceError as e:
        if e.code == "503":  # its database away (not open yet): as no server, try again
            out.error("unavailable", str(e))
            return UNAVAILABLE
        out.error("internal", str(e))
        return FAILED


def main(argv: list[str] | None = None) -> int:
    """The user commands on their own (`python -m client ...`)."""
    parser = argparse.ArgumentParser(prog="volumed", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
