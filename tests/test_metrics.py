"""/metrics through prometheus_client: every family typed and described, counters as counters,
read back by prometheus_client's parser (and `promtool check metrics` where it is installed);
the endpoint's HTTP: HEAD without a body, query strings, OpenMetrics when asked for, 405 and 404."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from test_server import FORMAT_ERROR, OK, exchange, running

from dtgserver.server.metrics import READ_AT_SCRAPE, Metrics, respond
from dtgserver.testing import dtg_bytes


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in the exposition")


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


async def scrape(tmp_path: Path) -> str:
    """A real server's /metrics after one packet stored and one format error."""
    async with running(tmp_path, metrics_port=0) as server:
        assert server.port and server.metrics_port
        assert await exchange(server.port, dtg_bytes()) == OK
        assert await exchange(server.port, b"\x05\x00") == FORMAT_ERROR
        response = await exchange(server.metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n", read=-1)
    status, headers, body = split(response)
    assert status == "HTTP/1.0 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    return body.decode("utf-8")


async def test_every_family_has_a_type_and_help_and_reads_back(tmp_path: Path) -> None:
    text = await scrape(tmp_path)
    found = families(text)
    assert all(f.documentation and f.type in ("counter", "gauge", "summary") for f in found.values())
    assert text.count("# TYPE ") == text.count("# HELP ") == len(found)
    assert value(text, "dtg_packets_total", kind="dtg") == 1
    assert value(text, "dtg_answers_total", result="0") == value(text, "dtg_answers_total", result="1") == 1
    assert value(text, "dtg_bodies_total") == 60
    assert value(text, "dtg_committed_packets_total") == 1
    assert value(text, "dtg_commits_total") == value(text, "dtg_commit_seconds_count") == 1
    assert value(text, "dtg_commit_batch_size_sum") == 1


async def test_counters_are_counters_and_gauges_gauges(tmp_path: Path) -> None:
    found = families(await scrape(tmp_path))
    for family in found.values():
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family
    assert found["dtg_open_connections"].type == "gauge"
    assert found["dtg_commit_seconds"].type == "summary"
    for name, (kind, _) in READ_AT_SCRAPE.items():
        base = name.removesuffix("_total").removesuffix("_sum")
        if "dtg_" + base in found:
            assert found["dtg_" + base].type == kind, name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
async def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    text = await scrape(tmp_path)
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_head_has_the_headers_and_no_body() -> None:
    metrics = Metrics()
    status, headers, body = split(respond(metrics, lambda: True, b"HEAD /metrics HTTP/1.0\r\n\r\n"))
    assert (status, body) == ("HTTP/1.0 200 OK", b"")
    _, _, full = split(respond(metrics, lambda: True, b"GET /metrics HTTP/1.0\r\n\r\n"))
    assert int(headers["content-length"]) == len(full) > 0
    assert split(respond(metrics, lambda: False, b"HEAD /healthz HTTP/1.0\r\n\r\n"))[::2] == \
        ("HTTP/1.0 503 Service Unavailable", b"")


@pytest.mark.parametrize(("request_line", "status", "body"), [
    (b"GET /metrics?name[]=dtg_bodies_total HTTP/1.0", "HTTP/1.0 200 OK", b"# HELP"),
    (b"GET /healthz?verbose=1 HTTP/1.1", "HTTP/1.0 200 OK", b"ok\n"),
    (b"GET /nothing HTTP/1.0", "HTTP/1.0 404 Not Found", b"not found\n"),
    (b"POST /metrics HTTP/1.0", "HTTP/1.0 405 Method Not Allowed", b"GET or HEAD only\n"),
    (b"", "HTTP/1.0 405 Method Not Allowed", b"GET or HEAD only\n"),
])
def test_paths_query_strings_and_methods(request_line: bytes, status: str, body: bytes) -> None:
    got_status, _, got_body = split(respond(Metrics(), lambda: True, request_line + b"\r\nHost: x\r\n\r\n"))
    assert got_status == status and got_body.startswith(body)


def test_openmetrics_when_the_scraper_asks() -> None:
    metrics = Metrics(gauges={"commits_total": lambda: 4, "commit_seconds_sum": lambda: 0.5})
    metrics.results[0] = 7
    accept = b"Accept: application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
    _, headers, body = split(respond(metrics, lambda: True, b"GET /metrics HTTP/1.0\r\n" + accept + b"\r\n"))
    assert headers["content-type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = openmetrics_families(text)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families for s in f.samples}
    assert samples[("dtg_answers_total", (("result", "0"),))] == 7
    assert samples[("dtg_commit_seconds_count", ())] == 4 and samples[("dtg_commit_seconds_sum", ())] == 0.5
