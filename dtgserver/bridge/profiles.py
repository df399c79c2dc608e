"""The Smart[Fleet] message profiles: per profile, the topics, the `ty` of every message and every message's keys.

A profile is data: `messages.py` knows how to compute every key (`KEY_SOURCES` below says where
each comes from, and docs/mqtt.md is written from it); a profile says which topics, which type
numbers and which keys, in which order, each kind of packet gets. Adding a profile is adding a
table here (and its name to `PROFILES`): the CLI's `--profile` choices are the registry's names.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

# Realtime packet kinds (records.KIND) whose bodies become microtrip elements.
REALTIME_KINDS = ("dtg", "obd", "mdt")

_DTG_KEYS = ("tid", "clt", "lat", "lon", "sp", "rpm", "fc", "cdit", "vv", "dtr", "dctr", "bsg", "gan", "acx", "acy",
             "tmp", "em")
_OBD_KEYS = ("tid", "clt", "lat", "lon", "sp", "rpm", "fc", "cdit", "vv", "dtr", "dctr", "gan", "tmp", "em")
_MDT_KEYS = ("tid", "clt", "lat", "lon", "sp", "cdit", "vv", "dtr", "dctr", "gan", "tmp", "em")
_GPS_KEYS = ("tid", "clt", "lat", "lon", "sp", "cdit", "vv", "dtr", "dctr", "gan", "tmp")  # the GPS Microtrip has no em

# The key lists both profiles share (values left out when unknown).
# The Trip in the OBD Trip table's order (spec §8.2.2.2.1), then our extension `xdd`.
TRIP_KEYS = ("tid", "stt", "edt", "dis", "tdis", "fc", "stlat", "stlon", "edlat", "edlon", "hsts", "mesp", "idt", "btv",
             "gnv", "wut", "est", "fwv", "dtvt", "xdd", "xpartial")
PARKING_KEYS = ("tid", "clt", "lat", "lon", "try", "vlt", "tim")
DEVICE_EVENT_KEYS = ("tid", "dsc", "dsn", "pdsc")
DEVICE_HEALTH_KEYS = ("ts", "modem", "dsc", "dsn")
BATTERY_WARNING_KEYS = ("tid", "wbv")
ATTRIBUTE_KEYS = ("ts", "modem", "vid", "vin", "model", "vehicle_type", "business_number", "driver_code", "fwv")

DEVICE_EVENT_TY = 900
"""The `ty` of our Device Status event (an extension): outside every number the message model uses
(seed events 20–30, the 2019 numbering's 101 on)."""

# key -> (where the value comes from, unit); docs/mqtt.md is written from this table.
KEY_SOURCES: Mapping[str, tuple[str, str]] = {
    "tid": ("realtime header KEY ON time as Unix seconds (the trip's identity)", "s"),
    "clt": ("body time (KST on the wire)", "ms UTC"),
    "lat": ("body latitude (wire ×1e6)", "°"),
    "lon": ("body longitude (wire ×1e6)", "°"),
    "sp": ("body speed", "km/h"),
    "rpm": ("body engine RPM", "1/min"),
    "fc": ("the trip's fuel so far: the body's total fuel − the trip's first body's (wire L×1000)", "mL"),
    "cdit": ("the body speeds since the trip's first body summed, one body a second, kept within 1 km of the "
             "odometer (docs/driving.md)", "m"),
    "em": ('the dangerous-driving behaviours recognised at this body, two hex digits of the spec\'s bits '
           '(docs/driving.md)', ""),
    "vv": ("body battery (wire V×10)", "V"),
    "dtr": ("body daily distance", "km"),
    "dctr": ("body total distance", "km"),
    "bsg": ("body brake signal (0/1; another wire byte is passed as it came)", ""),
    "gan": ("body azimuth", "° (0-360)"),
    "acx": ("body acceleration X (wire ×10)", "m/s²"),
    "acy": ("body acceleration Y (wire ×10)", "m/s²"),
    "tmp": ('body temperatures "A,B" (an absent/off sensor is an empty field; no key when both are)', "°C"),
    "stt": ("trip state: KEY ON time", "ms UTC"),
    "edt": ("the KEY OFF time the trip's first KEY OFF packet named (else its last body's)", "ms UTC"),
    "dis": ("the trip's distance: the last body's `cdit`", "m"),
    "tdis": ("the odometer at the trip's last body × 1000", "m"),
    "idt": ("bodies standing with the engine running (RPM above 0; MDT: every standing body)", "s"),
    "btv": ("the KEY OFF packet's battery: after the engine stopped", "V"),
    "gnv": ("the highest battery reading of a moving body", "V"),
    "wut": ("KEY ON to the first moving body (a trip that never moved: to its last body)", "s"),
    "est": ("bodies at 80–100 km/h", "s"),
    "xdd": ("**extension**: each dangerous-driving behaviour's count in the trip (docs/driving.md)", ""),
    "tim": ("the KEY OFF packet's send time − its KEY OFF time", "s"),
    "xpartial": ("**extension**: true when the Trip went out at the deadline, without its last bodies", ""),
    "stlat": ("trip state: first body's latitude", "°"),
    "stlon": ("trip state: first body's longitude", "°"),
    "edlat": ("that KEY OFF packet's latitude (else the last body's)", "°"),
    "edlon": ("that KEY OFF packet's longitude (else the last body's)", "°"),
    "hsts": ("trip state: highest body speed", "km/h"),
    "mesp": ("trip state: mean of the body speeds (one body per second), rounded", "km/h"),
    "dtvt": ("trip state: bodies with speed > 0 (bodies are collected every second)", "s"),
    "fwv": ("the last basic info's DTG firmware version", ""),
    "try": ("2 = parking (BlackBox trip type)", ""),
    "vlt": ("KEY OFF packet battery (wire V×10)", "V"),
    "dsc": ("**extension**: the DTG body's device status code, 2 digits (`00` ok; protocol §7)", ""),
    "dsn": ("**extension**: what `dsc` means, from the protocol's §7 table", ""),
    "pdsc": ("**extension**: the device status code before this change, 2 digits", ""),
    "wbv": ("KEY OFF packet battery (wire V×10)", "V"),
    "ts": ("attributes: the server's receive time of the basic info; device health: the body time the status "
           "began", "ms UTC"),
    "modem": ("basic info modem number (terminal phone number)", ""),
    "vid": ("basic info registration plate", ""),
    "vin": ("basic info VIN", ""),
    "model": ("basic info model name", ""),
    "vehicle_type": ("basic info vehicle type code", ""),
    "business_number": ("basic info business registration number", ""),
    "driver_code": ("basic info driver code", ""),
}
# `fc` in the Trip message has its own source: the trip's fuel, last − first total fuel (wire L×1000), in mL.


@attrs.frozen
class Profile:
    """One numbering of the message model: topics, `ty` per message, keys per message.

    Trip and parking messages take the `ty` of the kind of realtime packets the trip was made of
    (key "" when no trip is known); `string_keys` are sent as text instead of numbers. Each key
    list is the message's keys in JSON order; a key whose value is unknown is left out.
    Topics are formats of `modem` (the terminal's phone number); the two attributes topics are
    published retained: the basic info's, and the device health (the DTG's status code).
    """

    name: str
    microtrip_ty: Mapping[str, int]
    microtrip_keys: Mapping[str, tuple[str, ...]]
    trip_ty: Mapping[str, int]
    parking_ty: Mapping[str, int]
    battery_warning_ty: int
    string_keys: frozenset[str] = frozenset()
    trip_keys: tuple[str, ...] = TRIP_KEYS
    parking_keys: tuple[str, ...] = PARKING_KEYS
    device_event_keys: tuple[str, ...] = DEVICE_EVENT_KEYS
    device_health_keys: tuple[str, ...] = DEVICE_HEALTH_KEYS
    device_event_ty: int = DEVICE_EVENT_TY
    battery_warning_keys: tuple[str, ...] = BATTERY_WARNING_KEYS
    attribute_keys: tuple[str, ...] = ATTRIBUTE_KEYS
    telemetry_topic: str = "v1/sensors/{modem}/tre"
    attributes_topic: str = "v1/sensors/{modem}/attributes"
    device_health_topic: str = "v1/sensors/{modem}/attributes/health"


SEED = Profile(
    name="seed",
    microtrip_ty={"dtg": 2, "obd": 2, "mdt": 2},
    microtrip_keys={"dtg": _DTG_KEYS, "obd": _OBD_KEYS, "mdt": _MDT_KEYS},
    trip_ty={"dtg": 1, "obd": 1, "mdt": 1, "": 1},
    parking_ty={"dtg": 2, "obd": 2, "mdt": 2, "": 2},
    battery_warning_ty=23,
)

# The 2019 documents number types globally: GPS 1/2, OBD 3/4, DTG 9/10, events 101.., and give
# the DTG microtrip its own key list (no fc, cdit, vv; accelerations as text).
SF2019 = Profile(
    name="sf2019",
    microtrip_ty={"dtg": 10, "obd": 4, "mdt": 2},
    microtrip_keys={
        "dtg": ("tid", "clt", "dtr", "dctr", "sp", "rpm", "bsg", "lat", "lon", "gan", "acx", "acy", "tmp"),
        "obd": _OBD_KEYS,
        "mdt": _GPS_KEYS,
    },
    trip_ty={"dtg": 9, "obd": 3, "mdt": 1, "": 1},
    parking_ty={"dtg": 10, "obd": 4, "mdt": 2, "": 2},
    battery_warning_ty=104,
    string_keys=frozenset({"acx", "acy"}),
)

PROFILES: Mapping[str, Profile] = {p.name: p for p in (SEED, SF2019)}


def get_profile(name: str) -> Profile:
    """The profile called `name`; ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown message profile {name!r}; known: {', '.join(PROFILES)}") from None
