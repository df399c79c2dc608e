"""`--store nats://…` on the commands: the URL, devices and maintenance on the cluster, export from the stream."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result
from natscluster import NatsCluster, nats_cluster_fixture
from test_nats_store import running as running_nats
from test_nats_store import until_ok
from test_server import MAINTENANCE, OK, UNKNOWN, exchange
from test_server import running as running_sqlite

from dtgserver.cli import main
from dtgserver.protocol import encode
from dtgserver.store.jetstream import StoreUrl
from dtgserver.testing import basic_info, dtg, key_off, status_log

__all__ = ["nats_cluster_fixture"]


def run(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


# -- the URL ------------------------------------------------------------------------------------


def test_store_url_takes_hosts_and_credentials_and_never_prints_a_secret() -> None:
    url = StoreUrl.parse("nats://dtg:s3cr%40t@10.0.0.1:4222,10.0.0.2,[::1]:4333", env={})
    assert url.hosts == (("10.0.0.1", 4222), ("10.0.0.2", 4222), ("::1", 4333))
    assert (url.user, url.password, url.token, url.tls) == ("dtg", "s3cr@t", None, False)
    assert url.servers == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "nats://[::1]:4333"]
    assert str(url) == "nats://dtg@10.0.0.1:4222,10.0.0.2:4222,[::1]:4333"
    assert "s3cr" not in repr(url)
    token = StoreUrl.parse("tls://t0ken@nats.example:4443", env={})
    assert (token.token, token.tls, str(token)) == ("t0ken", True, "tls://***@nats.example:4443")
    from_env = StoreUrl.parse("nats://127.0.0.1", env={"DTGSERVER_STORE_USER": "u", "DTGSERVER_STORE_PASSWORD": "p"})
    assert (from_env.user, from_env.password) == ("u", "p")


@pytest.mark.parametrize("bad", ["http://h:1", "nats://", "nats://h:99999", "nats://h:x", "nats://h/stream",
                                 "nats://u:hunter2@h:0"])
def test_a_bad_store_url_is_a_usage_error_naming_the_option_and_no_secret(tmp_path: Path, bad: str) -> None:
    result = run("devices", "list", "--store", bad)
    assert result.exit_code == 2, result.output
    assert "--store" in result.output and "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_serve_with_store_takes_no_writer_process_and_no_mqtt(tmp_path: Path) -> None:
    for extra in (["--writer-process"], ["--mqtt", "mqtt://127.0.0.1"]):
        result = run("serve", "--store", "nats://127.0.0.1:1", "--port", "0", *extra)
        assert result.exit_code == 2 and "no --writer-process or --mqtt" in result.output, result.output


def test_a_command_on_an_unreachable_cluster_is_a_clear_error() -> None:
    from natscluster import free_ports

    port = free_ports(1)[0]
    result = run("maintenance", "on", "--store", f"nats://u:hunter2@127.0.0.1:{port}")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("dtgserver: error: cannot connect to the NATS cluster nats://u@127.0.0.1:")
    assert "hunter2" not in result.output and "Traceback" not in result.output
    # as a user sees it, logging set up as the program does: that one line, no "retrying" before it
    shown = subprocess.run([sys.executable, "-m", "dtgserver", "maintenance", "on", "--store",
                            f"nats://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and shown.stdout == "", shown
    assert len(shown.stderr.splitlines()) == 1, shown.stderr
    assert shown.stderr.startswith("dtgserver: error: cannot connect to the NATS cluster"), shown.stderr


# -- on the cluster -------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


async def test_devices_and_maintenance_commands_reach_a_server_on_another_node(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    other_node = nats_cluster.nodes[2].url
    packet = encode(dtg("01055550001", bodies=2))

    async def command(*args: str) -> Result:
        result = await trio.to_thread.run_sync(lambda: run(*args, "--store", other_node))
        assert result.exit_code == 0, result.output
        return result

    async with running_nats(tmp_path, nats_cluster.nodes[0].url) as server:
        port = server.port or 0
        await until_ok(port, packet)
        await command("maintenance", "on")
        with trio.fail_after(1.0):
            while await exchange(port, packet) != MAINTENANCE:
                await trio.sleep(0.02)
        await command("maintenance", "off")
        await command("devices", "add", "01055550002", "--note", "bus 7")
        await command("devices", "enforce", "on")
        with trio.fail_after(1.0):
            while await exchange(port, packet) != UNKNOWN:
                await trio.sleep(0.02)
        listed = await command("devices", "list", "--json")
        assert json.loads(listed.output) == {"registry_enforced": True, "maintenance": False, "devices": [
            {"modem": "01055550002", "status": "active", "note": "bus 7"}]}
        await command("devices", "remove", "01055550002")
        assert (await command("devices", "list")).output == "registry enforced; 0 device(s)\n"


def _without_receipt(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in o.items() if k not in ("received_at", "peer")} for o in objects]


async def test_export_reads_the_stream_back_in_the_json_of_the_sqlite_export(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    modem = "01066660001"
    packets = [encode(basic_info(modem)), encode(dtg(modem, bodies=3)), encode(key_off(modem)),
               encode(status_log(modem)), encode(dtg("01066660002", bodies=2))]
    async with running_nats(tmp_path, nats_cluster.url) as server:
        await until_ok(server.port or 0, packets[0])
        for packet in packets[1:]:
            assert await exchange(server.port or 0, packet) == OK
    async with running_sqlite(tmp_path / "sqlite") as server:
        for packet in packets:
            assert await exchange(server.port or 0, packet) == OK

    def exported(*args: object) -> list[dict[str, Any]]:
        result = run("export", *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    from_stream = await trio.to_thread.run_sync(exported, "--store", nats_cluster.url)
    from_sqlite = await trio.to_thread.run_sync(exported, "--data-dir", tmp_path / "sqlite")
    assert _without_receipt(from_stream) == _without_receipt(from_sqlite)
    assert len(from_stream) == len(packets)
    assert all(o["peer"].startswith("127.0.0.1:") and o["received_at"].endswith("+00:00") for o in from_stream)
    one = await trio.to_thread.run_sync(exported, "--store", nats_cluster.url, "--modem", "01066660002")
    assert [o["modem"] for o in one] == ["01066660002"]
    later = await trio.to_thread.run_sync(exported, "--store", nats_cluster.url, "--since",
                                          from_stream[2]["received_at"])
    assert _without_receipt(later) == _without_receipt(from_stream[2:])


# -- TLS and credentials, against one node of its own -------------------------------------------


@pytest.fixture(name="secured_node")
def secured_node_fixture(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """One JetStream node with TLS only (a throwaway CA) and a user and password: (port, ca.pem)."""
    from mosquitto import make_test_ca
    from natscluster import free_ports, require_nats

    ca, cert, key = make_test_ca(tmp_path / "ca")
    port = free_ports(1)[0]
    process = subprocess.Popen([require_nats(), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port),
                                "--tls", "--tlscert", str(cert), "--tlskey", str(key), "--user", "dtg",
                                "--pass", "hunter2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)
        yield port, ca
    finally:
        process.kill()
        process.wait()


def test_tls_and_a_password_from_the_environment(secured_node: tuple[int, Path]) -> None:
    port, ca = secured_node
    common = ["--store-tls-ca", ca, "--store-replicas", "1"]
    env = {"DTGSERVER_STORE": f"tls://127.0.0.1:{port}", "DTGSERVER_STORE_USER": "dtg",
           "DTGSERVER_STORE_PASSWORD": "hunter2"}
    added = run("devices", "add", "01012340000", *common, env=env)
    assert added.exit_code == 0, added.output
    listed = run("devices", "list", "--json", *common, env=env)
    assert listed.exit_code == 0 and json.loads(listed.output)["devices"][0]["modem"] == "01012340000", listed.output
    wrong = run("devices", "list", *common, env={**env, "DTGSERVER_STORE_PASSWORD": "wrong"})
    assert wrong.exit_code == 1 and wrong.output.startswith("dtgserver: error: cannot connect to the NATS cluster "
                                                            f"tls://dtg@127.0.0.1:{port}"), wrong.output
    untrusted = run("devices", "list", "--store-replicas", "1", env=env)  # the system CAs do not know the test CA
    assert untrusted.exit_code == 1 and "cannot connect" in untrusted.output, untrusted.output
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.output or "certificate verify failed" in untrusted.output
    plain = run("devices", "list", *common, env={**env, "DTGSERVER_STORE": f"nats://127.0.0.1:{port}"})
    assert plain.exit_code == 1, plain.output
    for result in (added, listed, wrong, untrusted, plain):
        assert "hunter2" not in result.output and "Traceback" not in result.output
