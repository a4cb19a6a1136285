"""The executor actor: volume commands in, CloudStack calls out, events published."""

from actors.executor.actor import ExecutorActor

__all__ = ["ExecutorActor"]
