"""`volumed dead-letters list|replay` and `volumed rebuild`: the operators' repairs of the
database from the log (actors/persistence/maintenance.py), on the daemon's settings."""

from __future__ import annotations

import argparse
import sys

from actors.persistence.errors import StoreError
from actors.persistence.maintenance import REPLAYABLE, NotEmpty, dead_letters, rebuild, replay
from actors.persistence.store import open_store
from bus import Bus
from bus.errors import BusError
from schemas.config import Settings, mask_url_password

CONNECT_TIMEOUT = 30.0


async def run_maintenance(args: argparse.Namespace, settings: Settings) -> int:
    try:
        bus = await Bus.connect_with(
            settings, f"volumed-{args.command}", give_up_after=CONNECT_TIMEOUT
        )
    except BusError as e:
        print(f"volumed: {e}", file=sys.stderr)
        return 3
    try:
        if args.command == "rebuild":
            return await _rebuild(bus, args.dsn)
        return await _dead_letters(bus, args, args.dsn or settings.db_dsn)
    except StoreError as e:
        print(f"volumed: the database refused: {e}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def _rebuild(bus: Bus, dsn: str) -> int:
    try:
        done = await rebuild(bus, dsn, progress=lambda text: print(text, file=sys.stderr))
    except NotEmpty as e:
        print(f"volumed: {e}", file=sys.stderr)
        return 2
    print(
        f"rebuilt {mask_url_password(dsn)}: {done.events} events and {done.proofs} mapping "
        f"proofs applied, {done.skipped} undecodable messages skipped"
        + (
            f"; events before sequence {done.first_event} had aged out and are missing"
            if done.first_event > 1
            else ""
        )
    )
    return 0


async def _dead_letters(bus: Bus, args: argparse.Namespace, dsn: str) -> int:
    letters = await dead_letters(bus, subject=args.subject)
    if args.action == "list":
        for d in letters:
            print(
                f"{d.seq}\t{d.stream}/{d.consumer}\t{d.subject} (seq {d.stream_seq}, "
                f"{d.deliveries} deliveries)\t{d.reason}"
            )
        print(f"{len(letters)} dead letters", file=sys.stderr)
        return 0
    # Only what persistence dead-lettered is re-applied; a command is sent again instead.
    mine = [d for d in letters if d.stream in REPLAYABLE]
    if len(mine) < len(letters):
        print(
            f"{len(letters) - len(mine)} dead letters of other consumers (commands) left alone",
            file=sys.stderr,
        )
    store = await open_store(dsn)
    try:
        outcomes = await replay(bus, store, mine, keep=args.keep)
    finally:
        await store.close()
    failed = 0
    for d, outcome in outcomes:
        print(f"{d.seq}\t{d.subject}\t{outcome}")
        failed += outcome != "applied"
    print(
        f"{len(outcomes) - failed} applied, {failed} not (still in VOLUMED_DEAD_LETTERS)",
        file=sys.stderr,
    )
    return 1 if failed else 0
