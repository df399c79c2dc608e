"""Stored packets as JSON lines (the `decode` format plus `received_at`) or GeoJSON trips."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from ..protocol import BadTime, ProtocolError, Realtime, decode, format_time, to_json
from .packets import StoredPacket


def received_at_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def packet_json(packet: StoredPacket) -> dict[str, Any]:
    """The packet as `dtgserver decode` prints it, plus when and from where it was received."""
    try:
        out = to_json(decode(packet.raw))
    except ProtocolError as e:  # stored by an older decoder that accepted it: still exportable
        out = {"kind": packet.kind, "modem": packet.modem, "raw": packet.raw.hex(), "error": str(e)}
    out["received_at"] = received_at_iso(packet.received_at)
    out["peer"] = packet.peer
    return out


def jsonl(packets: Iterable[StoredPacket]) -> Iterator[dict[str, Any]]:
    for packet in packets:
        yield packet_json(packet)


def geojson(packets: Iterable[StoredPacket]) -> dict[str, Any]:
    """A FeatureCollection with one LineString per trip (terminal and KEY ON time), points in time order.

    Bodies without a position fix (lon = lat = 0) are left out of the line, never moved.
    """
    trips: dict[tuple[str, str], dict[str, Any]] = {}
    for packet in packets:
        try:
            record = decode(packet.raw)
        except ProtocolError:
            continue
        if not isinstance(record, Realtime) or isinstance(record.key_on_time, BadTime):
            continue
        key = (str(record.modem), format_time(record.key_on_time))
        trip = trips.setdefault(key, {"points": [], "max_speed_kmh": 0, "kind": record.KIND,
                                      "tid": int(record.key_on_time.timestamp())})
        for body in record.bodies:
            if isinstance(body.time, BadTime) or (body.lon == 0 and body.lat == 0):
                continue
            trip["points"].append((body.time, body.lon, body.lat))
            trip["max_speed_kmh"] = max(trip["max_speed_kmh"], body.speed_kmh)
    features = []
    for (modem, key_on), trip in trips.items():
        points = sorted(trip["points"], key=lambda p: p[0])
        if not points:
            continue
        coordinates = [[lon, lat] for _, lon, lat in points]
        if len(coordinates) == 1:
            coordinates.append(coordinates[0])  # a LineString needs two positions
        features.append({
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": coordinates},
            "properties": {
                "modem": modem, "kind": trip["kind"], "tid": trip["tid"], "key_on_time": key_on,
                "start": format_time(points[0][0]), "end": format_time(points[-1][0]),
                "points": len(points), "max_speed_kmh": trip["max_speed_kmh"],
            },
        })
    return {"type": "FeatureCollection", "features": features}
