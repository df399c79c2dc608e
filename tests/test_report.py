"""`dtgserver report`: behaviours per 100 km per vehicle and per driver, from a store that terminals
filled over TCP (a real server), in table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner, Result
from test_export import fill

from dtgserver.cli import main
from dtgserver.protocol import BasicInfo, DtgRealtime, encode
from dtgserver.testing import KEY_ON, dtg_body

TRUCK, TAXI = "01011112222", "01033334444"


def basic(modem: str, vehicle_type: str, driver: str, plate: str) -> bytes:
    return encode(BasicInfo(modem, "DTG-1000", "KMHFC41MP6A123456", vehicle_type, plate, "1234567890", driver,
                            "1.0.2"))


def minute(modem: str, speeds: list[int], at: int, *, key_on: Any = KEY_ON) -> bytes:
    """One realtime packet of 1 Hz bodies from minute `at` of the trip (odometer +1 km a minute)."""
    start = key_on + timedelta(minutes=at)
    bodies = [attrs.evolve(dtg_body(start + timedelta(seconds=s), at * 60 + s), speed_kmh=speed)
              for s, speed in enumerate(speeds)]
    return encode(DtgRealtime(modem, 1, key_on, bodies))


def run(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["report", "--data-dir", str(data_dir), *args])


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    await fill(tmp_path, [
        basic(TRUCK, "31", "DRIVER-A", "서울33가1234"),
        # 36 km/h, slowing to 20 at the minute's end and off again at 30 in the next packet: one
        # harsh deceleration (-16 km/h in 1 s) and one acceleration lasting two seconds (+10, +6)
        minute(TRUCK, [36] * 59 + [20], 0),
        minute(TRUCK, [30] + [36] * 59, 1),
        basic(TAXI, "22", "DRIVER-B", "경기12바3456"),
        minute(TAXI, [72] * 60, 0, key_on=KEY_ON + timedelta(hours=2)),
    ])
    return tmp_path


async def test_report_per_vehicle_as_json(store: Path) -> None:
    result = run(store, "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["edition"] == "2022" and out["by"] == "vehicle"
    truck, taxi = out["rows"]
    assert truck["vehicle"] == TRUCK and truck["classes"] == ["truck"] and truck["drivers"] == ["DRIVER-A"]
    assert truck["plates"] == ["서울33가1234"] and truck["trips"] == 1
    assert truck["distance_km"] == 1.194  # (118 × 36 + 20 + 30) km/h × 1 s
    assert truck["driving_s"] == 120
    assert truck["counts"] == {"start": 0, "acceleration": 1, "deceleration": 1, "stop": 0, "left_turn": 0,
                               "right_turn": 0, "u_turn": 0, "lane_change": 0, "overtaking": 0}
    assert truck["per_100km"]["acceleration"] == round(100 / 1.194, 2)
    assert truck["per_100km"]["stop"] == 0
    assert taxi["vehicle"] == TAXI and taxi["classes"] == ["taxi"] and taxi["distance_km"] == 1.2
    assert not any(taxi["counts"].values())


async def test_report_per_driver_and_period(store: Path) -> None:
    result = run(store, "--by", "driver", "--format", "json")
    rows = {row["driver"]: row for row in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"DRIVER-A", "DRIVER-B"} and rows["DRIVER-A"]["modems"] == [TRUCK]
    # the bodies' own times bound the period: the truck's second minute only (KEY ON is 08:00 KST)
    result = run(store, "--format", "json", "--since", "2026-11-21T08:01:00", "--until", "2026-11-21T09:00:00")
    rows = {row["vehicle"]: row for row in json.loads(result.stdout)["rows"]}
    assert set(rows) == {TRUCK}
    assert rows[TRUCK]["driving_s"] == 60 and rows[TRUCK]["counts"]["acceleration"] == 1
    assert rows[TRUCK]["counts"]["deceleration"] == 0


async def test_report_class_override_edition_and_default(store: Path) -> None:
    # as a taxi the truck's changes are not harsh (acceleration ≥ 10 from 20 km/h, deceleration ≥ 14)
    result = run(store, "--format", "json", "--vehicle-class", f"{TRUCK}=taxi")
    truck = json.loads(result.stdout)["rows"][0]
    assert truck["classes"] == ["taxi"] and truck["counts"]["acceleration"] == 1
    assert truck["counts"]["deceleration"] == 1  # -16 ≥ 14
    result = run(store, "--format", "json", "--vehicle-class", f"{TRUCK}=bus", "--edition", "chart")
    truck = json.loads(result.stdout)["rows"][0]
    assert truck["classes"] == ["bus"] and truck["counts"]["acceleration"] == 1  # +10 ≥ 6


async def test_report_table_and_csv(store: Path) -> None:
    result = run(store)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["vehicle", "plate", "class", "trips", "km", "driving"]
    assert lines[1].split()[:6] == [TRUCK, "서울33가1234", "truck", "1", "1.2", "0:02"]
    assert "speeding is not computed" in lines[-1]
    result = run(store, "--format", "csv", "--modem", TAXI)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1 and rows[0]["vehicle"] == TAXI and rows[0]["acceleration_per_100km"] == "0.00"


async def test_report_errors(tmp_path: Path, store: Path) -> None:
    result = run(tmp_path / "nothing")
    assert result.exit_code == 1 and result.stderr.strip() == f"dtgserver: error: no store in {tmp_path / 'nothing'}"
    result = run(store, "--vehicle-class", "01011112222=van")
    assert result.exit_code == 2 and "Invalid value for '--vehicle-class'" in result.stderr
    result = run(store, "--since", "yesterday")
    assert result.exit_code == 2 and "--since" in result.stderr
