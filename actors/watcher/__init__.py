"""The device watcher: block devices from sysfs and kernel uevents, published per VM."""

from actors.watcher.actor import WatcherActor
from actors.watcher.netlink import Uevent, UeventSocket, parse_uevent
from actors.watcher.state import diff, diff_one, same_device
from actors.watcher.sysfs import read_device, scan

__all__ = [
    "Uevent",
    "UeventSocket",
    "WatcherActor",
    "diff",
    "diff_one",
    "parse_uevent",
    "read_device",
    "same_device",
    "scan",
]
