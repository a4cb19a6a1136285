"""`volumed` command line: `volumed run [ACTOR...]`, `volumed provision`, `volumed migrate`,
`volumed dead-letters list|replay`, `volumed rebuild --dsn DSN`,
`volumed simulator ...`, `volumed demo`, and the user commands of the client
(`volumed create|attach|...|watch|health`, see client/cli.py)."""

# Only the standard library and actors.signals up here: for `volumed run` the signal
# handlers come first, and everything else is imported after them (see main).
from __future__ import annotations

import sys

from actors.signals import StopSignals

# `volumed provision` waits for NATS like `run` does, but not for ever: it is a one-shot.
PROVISION_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # Before the imports below, which take seconds on a busy host (aiohttp, nats, the
        # actors): a SIGTERM during them would otherwise kill the process (exit -15).
        stop = StopSignals.catch()
        try:
            return _main(argv, stop)
        finally:
            stop.ignore()
    return _main(argv, None)


def _main(argv: list[str], stop: StopSignals | None) -> int:
    if argv[:1] == ["simulator"]:
        from simulator.cli import main as simulator_main

        return simulator_main(argv[1:])
    if argv[:1] == ["demo"]:
        # Imported only here: nothing of the demo is loaded by `volumed run`.
        from actors.demo import main as demo_main

        return demo_main(argv[1:])

    import argparse
    import asyncio
    import logging

    from actors.logs import SECRETS, setup_logging
    from actors.metrics.exporter import CannotListen
    from actors.supervisor import RUNNABLE, default_actors, provision, run_until_signalled
    from client import cli as user_cli
    from schemas.config import ConfigError, load_settings

    parser = argparse.ArgumentParser(prog="volumed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run actors until SIGTERM/SIGINT (all by default)")
    run.add_argument(
        "actors",
        nargs="*",
        choices=[[], *RUNNABLE],
        metavar="ACTOR",
        help=f"any of: {', '.join(RUNNABLE)} (default: all but the gateway, which "
        "VOLUMED_HTTP_ADDR adds)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with the same keys as the environment, lower case, without VOLUMED_",
    )
    setup = sub.add_parser(
        "provision",
        help="create or update volumed's streams, consumers and KV buckets, then exit "
        "(for least-privilege actor users: see docs/operations.md)",
    )
    setup.add_argument("--config", metavar="FILE", help="as for run")
    migrate = sub.add_parser(
        "migrate",
        help="convert the Go daemon's tables in VOLUMED_DB_DSN to volumed's, keeping every "
        "row and the Go tables as <table>_go_backup_<date> (see docs/migrating.md)",
    )
    migrate.add_argument("--config", metavar="FILE", help="as for run")
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the statements; change nothing"
    )
    dead = sub.add_parser(
        "dead-letters",
        help="list the dead letters, or re-apply dead-lettered events and proofs to the "
        "database after a fix (docs/operations.md)",
    )
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument(
        "--subject", default="", help="only those first published on this subject (wildcards)"
    )
    dead.add_argument("--dsn", help="the database to apply them to (default: VOLUMED_DB_DSN)")
    dead.add_argument("--keep", action="store_true", help="keep the letters applied")
    dead.add_argument("--config", metavar="FILE", help="as for run")
    rebuild = sub.add_parser(
        "rebuild",
        help="rebuild volume_operations and device_mappings from the streams into an empty "
        "database (docs/operations.md)",
    )
    rebuild.add_argument("--dsn", required=True, help="the empty database to fill")
    rebuild.add_argument("--config", metavar="FILE", help="as for run")
    sub.add_parser("simulator", help="run the CloudStack simulator (see volumed simulator -h)")
    sub.add_parser(
        "demo", help="everything private on this machine, walked through (volumed demo -h)"
    )
    user_cli.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in user_cli.COMMANDS:
        return user_cli.run(args)

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"volumed: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, log_format=settings.log_format)
    SECRETS.add(*settings.secrets())
    log = logging.getLogger("volumed")
    log.info("settings: %s", settings)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; tolerate its absence
        pass
    if args.command in ("dead-letters", "rebuild"):
        from actors.maintenance_cli import run_maintenance

        return asyncio.run(run_maintenance(args, settings))
    if args.command == "provision":
        try:
            asyncio.run(asyncio.wait_for(provision(settings), PROVISION_TIMEOUT))
        except TimeoutError:
            print(f"volumed: NATS not usable within {PROVISION_TIMEOUT:.0f} s", file=sys.stderr)
            return 1
        log.info("provisioned")
        return 0
    if args.command == "migrate":
        from actors.persistence.errors import StoreError
        from actors.persistence.takeover import migrate as migrate_tables

        try:
            return asyncio.run(migrate_tables(settings.db_dsn, dry_run=args.dry_run))
        except StoreError as e:
            print(f"volumed: {e}", file=sys.stderr)
            return 1
    assert stop is not None  # `run` caught the signals first thing
    if stop.received is not None:
        log.info("%s during start-up: stopped before connecting", stop.received.name)
        return 0
    try:
        actors = args.actors or default_actors(settings)
        asyncio.run(run_until_signalled(settings, actors, stop))
    except CannotListen as e:
        print(f"volumed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
