"""`dtgserver export`: stored packets as decode JSON lines or GeoJSON trips, and the status log files.

The store is filled the way terminals fill it: a real server on 127.0.0.1 port 0, packets over TCP.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from click.testing import CliRunner, Result
from test_server import OK, running

from dtgserver.cli import main
from dtgserver.protocol import KST, BadTime, DtgRealtime, StatusLog, decode, encode, to_json
from dtgserver.store import read_stored, status_log_path
from dtgserver.testing import KEY_ON, basic_info, dtg, key_off, status_log


async def send(port: int, packet: bytes) -> tuple[bytes, str]:
    """One packet on its own connection: the answer, and the peer address the server saw."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            host, local_port = stream.socket.getsockname()[:2]
            await stream.send_all(packet)
            answer = b""
            while len(answer) < 2 and (chunk := await stream.receive_some(2)):
                answer += chunk
            return answer, f"{host}:{local_port}"


async def fill(data_dir: Path, packets: list[bytes]) -> list[str]:
    """Each packet answered 0, one after another, a little apart in time; returns the peers."""
    peers = []
    async with running(data_dir) as server:
        assert server.port
        for packet in packets:
            answer, peer = await send(server.port, packet)
            assert answer == OK
            peers.append(peer)
            await trio.sleep(0.02)  # received_at strictly increasing, with room for a bound between
    return peers


def export(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["export", "--data-dir", str(data_dir), *args])


def lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- jsonl --------------------------------------------------------------------------------------

A, B = "01011112222", "01033334444"
THREE = [dtg(A, bodies=3), dtg(B, bodies=3), dtg(A, minute=1, bodies=3)]


async def test_jsonl_is_the_decode_json_plus_received_at_and_peer(tmp_path: Path) -> None:
    packets = [encode(basic_info(A)), encode(THREE[0]), encode(key_off(A)), encode(status_log(A))]
    before = datetime.now(UTC)
    peers = await fill(tmp_path, packets)
    after = datetime.now(UTC)
    exported = lines(export(tmp_path))
    assert len(exported) == len(packets)
    times = [o["received_at"] for o in exported]
    assert times == sorted(times)
    for obj, raw, peer in zip(exported, packets, peers, strict=True):
        received_at = datetime.fromisoformat(obj.pop("received_at"))
        assert received_at.utcoffset() == timedelta(0)
        assert before - timedelta(milliseconds=1) <= received_at <= after
        assert obj.pop("peer") == peer
        assert obj == to_json(decode(raw))
        decoded = CliRunner().invoke(main, ["decode", raw.hex()])
        assert obj == json.loads(decoded.stdout)  # exactly what `dtgserver decode` prints
    assert [o["kind"] for o in exported] == ["basic_info", "dtg", "key_off", "status_log"]


async def test_jsonl_reads_while_the_server_runs(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        assert server.port
        assert (await send(server.port, encode(THREE[0])))[0] == OK
        assert [o["modem"] for o in lines(export(tmp_path))] == [A]
        assert (await send(server.port, encode(THREE[1])))[0] == OK
        assert [o["modem"] for o in lines(export(tmp_path))] == [A, B]


async def test_jsonl_merges_the_shards_in_receive_order(tmp_path: Path) -> None:
    from dtgserver.server.app import DtgServer
    from dtgserver.server.config import ServerConfig
    from dtgserver.store.packets import shard_of

    modems = [f"010{n:08d}" for n in range(8)]
    assert {shard_of(m, 2) for m in modems} == {0, 1}
    server = DtgServer(ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path, grace_period=2.0), shards=2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        for i, modem in enumerate(modems * 2):  # alternating shards, each terminal twice
            assert (await send(port, encode(dtg(modem, minute=i, bodies=1))))[0] == OK
        server.stop()
    assert sorted(p.name for p in tmp_path.glob("store-*.db")) == ["store-0.db", "store-1.db"]
    exported = lines(export(tmp_path))
    assert [o["modem"] for o in exported] == modems * 2
    assert [o["bodies"][0]["time"][11:16] for o in exported] == [f"08:{i:02d}" for i in range(16)]


def kst_naive(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, KST).replace(tzinfo=None).isoformat()


# How a user may write one instant: Unix seconds, ISO 8601 with an offset, or without (then KST).
TIME_FORMS = {
    "unix": lambda s: repr(s),
    "iso_utc": lambda s: datetime.fromtimestamp(s, UTC).isoformat(),
    "iso_z": lambda s: datetime.fromtimestamp(s, UTC).isoformat().replace("+00:00", "Z"),
    "iso_kst_offset": lambda s: datetime.fromtimestamp(s, KST).isoformat(),
    "iso_minus_5h": lambda s: datetime.fromtimestamp(s, timezone(timedelta(hours=-5))).isoformat(),
    "iso_no_offset_is_kst": kst_naive,
}


@pytest.mark.parametrize("form", sorted(TIME_FORMS))
async def test_filters_modem_since_until(tmp_path: Path, form: str) -> None:
    await fill(tmp_path, [encode(r) for r in THREE])
    r0, r1, r2 = (p.received_at for p in read_stored(tmp_path))
    between_01, between_12 = TIME_FORMS[form]((r0 + r1) / 2), TIME_FORMS[form]((r1 + r2) / 2)

    def chosen(*args: str) -> list[int]:
        return [THREE.index(decode_json(o)) for o in lines(export(tmp_path, *args))]

    assert chosen() == [0, 1, 2]
    assert chosen("--since", between_01) == [1, 2]
    assert chosen("--until", between_12) == [0, 1]
    assert chosen("--since", between_01, "--until", between_12) == [1]
    assert chosen("--modem", A) == [0, 2]
    assert chosen("--modem", A, "--since", between_01) == [2]
    assert chosen("--modem", "01099999999") == []
    assert chosen("--since", between_12, "--until", between_01) == []


def decode_json(obj: dict[str, Any]) -> Any:
    from dtgserver.protocol import from_json

    return from_json({k: v for k, v in obj.items() if k not in ("received_at", "peer")})


async def test_since_is_inclusive_until_exclusive(tmp_path: Path) -> None:
    await fill(tmp_path, [encode(r) for r in THREE])
    r1 = [p.received_at for p in read_stored(tmp_path)][1]
    assert [o["modem"] for o in lines(export(tmp_path, "--since", repr(r1)))] == [B, A]
    assert [o["modem"] for o in lines(export(tmp_path, "--until", repr(r1)))] == [A]


async def test_iso_without_offset_is_kst_not_utc(tmp_path: Path) -> None:
    await fill(tmp_path, [encode(THREE[0])])
    (received,) = [p.received_at for p in read_stored(tmp_path)]
    # Eight hours after the packet read as UTC is still before it read as KST (UTC+9).
    later_utc = datetime.fromtimestamp(received, UTC) + timedelta(hours=8)
    naive = later_utc.replace(tzinfo=None).isoformat()
    assert len(lines(export(tmp_path, "--since", naive))) == 1
    assert len(lines(export(tmp_path, "--since", naive + "+00:00"))) == 0
    assert len(lines(export(tmp_path, "--since", "2000-01-01"))) == 1  # a date alone: midnight KST
    assert len(lines(export(tmp_path, "--until", "2000-01-01"))) == 0


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "21/11/2026", "", "nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("option", ["--since", "--until"])
async def test_bad_time_is_a_clear_error(tmp_path: Path, bad: str, option: str) -> None:
    await fill(tmp_path, [encode(THREE[0])])
    result = export(tmp_path, option, bad)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert f"Invalid value for {option}: {bad!r} is neither ISO 8601 nor Unix seconds" in result.stderr
    assert result.stdout == ""


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = export(tmp_path / "nowhere")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"dtgserver: error: no store in {tmp_path / 'nowhere'}\n"
    assert not (tmp_path / "nowhere").exists()  # looking created nothing


@pytest.mark.parametrize("fmt", ["jsonl", "geojson"])
def test_data_dir_without_a_store_is_a_clear_error(tmp_path: Path, fmt: str) -> None:
    assert CliRunner().invoke(main, ["maintenance", "on", "--data-dir", str(tmp_path)]).exit_code == 0
    result = export(tmp_path, "--format", fmt)  # control.db only: no packets were ever stored
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"dtgserver: error: no store in {tmp_path}\n"
    assert result.stdout == ""


def test_a_broken_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "store-0.db").write_bytes(b"not a database, " * 512)
    result = export(tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"dtgserver: error: cannot read the store in {tmp_path}: file is not a database\n"


async def test_files_that_are_no_shards_are_ignored(tmp_path: Path) -> None:
    await fill(tmp_path, [encode(THREE[0])])
    (tmp_path / "store-old.db").write_bytes(b"a copy someone left here")
    (tmp_path / "store-0-backup.db").write_bytes(b"another")
    assert [o["modem"] for o in lines(export(tmp_path))] == [A]
    async with running(tmp_path) as server:  # the server's shard count check reads the same list
        assert server.port
        assert (await send(server.port, encode(THREE[1])))[0] == OK
    assert [o["modem"] for o in lines(export(tmp_path))] == [A, B]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    result = export(tmp_path, "--format", "csv")
    assert result.exit_code == 2 and "csv" in result.stderr


# -- geojson ------------------------------------------------------------------------------------


def assert_feature_collection(doc: Any) -> None:
    """The shape RFC 7946 asks for, as far as these exports use it."""
    assert set(doc) == {"type", "features"} and doc["type"] == "FeatureCollection"
    assert isinstance(doc["features"], list)
    for feature in doc["features"]:
        assert set(feature) == {"type", "geometry", "properties"} and feature["type"] == "Feature"
        assert isinstance(feature["properties"], dict)
        geometry = feature["geometry"]
        assert set(geometry) == {"type", "coordinates"} and geometry["type"] == "LineString"
        assert len(geometry["coordinates"]) >= 2  # a LineString has two positions or more
        for position in geometry["coordinates"]:
            assert len(position) == 2 and all(isinstance(v, int | float) for v in position)
            lon, lat = position
            assert -180 <= lon <= 180 and -90 <= lat <= 90


def positions(record: DtgRealtime) -> list[tuple[Any, list[float]]]:
    return [(b.time, [b.lon, b.lat]) for b in record.bodies if (b.lon, b.lat) != (0, 0)]


def geojson(data_dir: Path, *args: str) -> dict[str, Any]:
    result = export(data_dir, "--format", "geojson", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(result.stdout.splitlines()) == 1  # one document
    doc: dict[str, Any] = json.loads(result.stdout)
    assert_feature_collection(doc)
    return doc


async def test_geojson_one_linestring_per_trip_in_time_order(tmp_path: Path) -> None:
    second_trip = KEY_ON + timedelta(hours=3)
    a0, a1 = dtg(A, bodies=5), dtg(A, minute=1, bodies=5)
    lost_fix = attrs.evolve(a1.bodies[2], lon=0.0, lat=0.0)  # no position: left out, never moved
    a1 = attrs.evolve(a1, bodies=[*a1.bodies[:2], lost_fix, *a1.bodies[3:]])
    a_later = dtg(A, key_on=second_trip, bodies=4)
    b0 = dtg(B, bodies=1)
    sent = [encode(basic_info(A)), encode(a1), encode(a0), encode(b0), encode(a_later), encode(key_off(A)),
            encode(status_log(A))]  # the second minute arrives first: a resend after a lost answer
    await fill(tmp_path, sent)

    doc = geojson(tmp_path)
    trips = {(f["properties"]["modem"], f["properties"]["key_on_time"]): f for f in doc["features"]}
    assert sorted(trips) == [(A, "2026-11-21T08:00:00+09:00"), (A, "2026-11-21T11:00:00+09:00"),
                             (B, "2026-11-21T08:00:00+09:00")]

    first = trips[(A, "2026-11-21T08:00:00+09:00")]
    expected = [p for _, p in sorted(positions(a0) + positions(a1))]
    assert first["geometry"]["coordinates"] == expected
    assert len(expected) == 9 and [0.0, 0.0] not in expected
    assert expected[0][0] > 100  # [lon, lat]: Korea is at 127 E, 37 N
    assert first["properties"]["points"] == 9
    assert first["properties"]["start"] == "2026-11-21T08:00:00+09:00"
    assert first["properties"]["end"] == "2026-11-21T08:01:04+09:00"
    assert first["properties"]["kind"] == "dtg"
    assert first["properties"]["tid"] == int(KEY_ON.timestamp())

    assert trips[(A, "2026-11-21T11:00:00+09:00")]["geometry"]["coordinates"] == [p for _, p in positions(a_later)]
    (only,) = [p for _, p in positions(b0)]
    assert trips[(B, "2026-11-21T08:00:00+09:00")]["geometry"]["coordinates"] == [only, only]  # one point: twice

    just_b = geojson(tmp_path, "--modem", B)
    assert [f["properties"]["modem"] for f in just_b["features"]] == [B]


async def test_geojson_without_positions_is_an_empty_collection(tmp_path: Path) -> None:
    await fill(tmp_path, [encode(basic_info(A)), encode(key_off(A))])
    assert geojson(tmp_path) == {"type": "FeatureCollection", "features": []}


# -- status logs: 0x63 and its alias 0x99, and their files ---------------------------------------

SECOND = hashlib.sha256(b"second, same send time").hexdigest()[:16]
LOG_NAME = re.compile(r"[0-9]+(_[0-9a-f]{16})?\.log")  # digits from the packet; _<hex> from the server only


async def test_status_log_alias_0x99_stored_and_written(tmp_path: Path) -> None:
    alias = StatusLog("01055556666", KEY_ON, "0x99 로그\n두 번째 줄", protocol_id=0x99)
    raw = encode(alias)
    assert raw[0] == 0x99
    await fill(tmp_path, [raw])

    (packet,) = read_stored(tmp_path)
    assert (packet.kind, packet.modem, packet.raw) == ("status_log", "01055556666", raw)
    (obj,) = lines(export(tmp_path))
    assert (obj["kind"], obj["protocol_id"], obj["log"]) == ("status_log", 0x99, "0x99 로그\n두 번째 줄")
    path = tmp_path / "logs" / "01055556666" / "2026112108000000.log"
    assert path.read_text("utf-8") == "0x99 로그\n두 번째 줄"
    assert [p.name for p in (tmp_path / "logs").rglob("*") if p.is_file()] == [path.name]


async def test_status_log_file_names_are_digits(tmp_path: Path) -> None:
    """Digits, and for a second log with the same send time the start of its bytes' SHA-256."""
    bad_time = BadTime(bytes([26, 13, 40, 25, 61, 61, 100]))  # no calendar time: its bytes, as digits
    sent = [status_log("01055556666", "first"), status_log("01055556666", "second, same send time"),
            StatusLog("01055556666", bad_time, "bad clock"), status_log("01077778888", "other terminal")]
    await fill(tmp_path, [encode(r) for r in sent] + [encode(sent[0])])  # the resend writes no file
    files = sorted(p.relative_to(tmp_path / "logs") for p in (tmp_path / "logs").rglob("*.log"))
    assert [str(f) for f in files] == [
        "01055556666/026013040025061061100.log",
        "01055556666/2026112108000000.log",
        f"01055556666/2026112108000000_{SECOND}.log",
        "01077778888/2026112108000000.log",
    ]
    for f in files:
        assert f.parent.name.isascii() and f.parent.name.isdigit()
        assert LOG_NAME.fullmatch(f.name), f
    assert (tmp_path / "logs/01055556666/2026112108000000.log").read_text("utf-8") == "first"
    assert (tmp_path / f"logs/01055556666/2026112108000000_{SECOND}.log").read_text("utf-8") == "second, same send time"
    assert (tmp_path / "logs/01055556666/026013040025061061100.log").read_text("utf-8") == "bad clock"


@pytest.mark.parametrize("modem", ["../../etc", "0101/../x", "٠١٠١٢٣", ""])
def test_status_log_path_refuses_anything_but_ascii_digits(tmp_path: Path, modem: str) -> None:
    with pytest.raises(ValueError, match="is not digits"):
        status_log_path(tmp_path, StatusLog(modem, KEY_ON, "x"))
