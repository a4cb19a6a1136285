"""Diffing observed devices against the known ones: pure, so both paths (uevents and
rescans) share it and it is testable alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from schemas.devices import DeviceInfo

ChangeKind = Literal["added", "removed", "changed", "updated"]
Change = tuple[ChangeKind, DeviceInfo]


def same_device(a: DeviceInfo, b: DeviceInfo) -> bool:
    """Whether two observations under one name are the same disk. A different size, serial
    or controller means it went and another came (a remove and an add); a by-id link that
    appeared late, or the time it was first seen, do not."""
    return (
        a.name == b.name
        and a.size == b.size
        and a.serial == b.serial
        and a.controller == b.controller
        and a.path == b.path
    )


def resized(a: DeviceInfo, b: DeviceInfo) -> bool:
    """Whether ``b`` is disk ``a`` with another size (the kernel's capacity change): same
    name, serial, controller and node. A resize is a change of a known disk, never a remove
    and an add: it keeps its owner and can never be taken for a new disk."""
    return (
        a.size != b.size
        and a.name == b.name
        and a.serial == b.serial
        and a.controller == b.controller
        and a.path == b.path
    )


def diff_one(old: DeviceInfo | None, new: DeviceInfo | None) -> list[Change]:
    """What changed for one name. ``changed`` is a resize of the same disk; ``updated``
    carries a new by-id link of the same disk, which is recorded but not announced."""
    if old is None:
        return [] if new is None else [("added", new)]
    if new is None:
        return [("removed", old)]
    if resized(old, new):
        return [("changed", new)]
    if not same_device(old, new):
        return [("removed", old), ("added", new)]
    if new.by_id_path != old.by_id_path and new.by_id_path is not None:
        return [("updated", new)]
    return []


def diff(known: Mapping[str, DeviceInfo], seen: Mapping[str, DeviceInfo]) -> list[Change]:
    """Every change from ``known`` to ``seen``: removals first (a name that was freed and
    taken again reads as a remove then an add), then additions, each in name order."""
    changes = [
        c
        for name in sorted(known.keys() | seen.keys())
        for c in diff_one(known.get(name), seen.get(name))
    ]
    order = {"removed": 0, "changed": 1, "updated": 1, "added": 2}
    return sorted(changes, key=lambda c: order[c[0]])  # stable: name order kept per kind
