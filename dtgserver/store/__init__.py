"""Durable storage: packet shards with a group-commit writer, and the control database."""

from .control import Control, ControlState, Device, DeviceStatus
from .logfiles import status_log_path
from .packets import PacketStore, StoredPacket, digest, read_stored, shard_paths

__all__ = [
    "Control", "ControlState", "Device", "DeviceStatus", "PacketStore", "StoredPacket", "digest", "read_stored",
    "shard_paths", "status_log_path",
]
