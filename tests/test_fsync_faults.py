"""A failed fdatasync: the packet is answered 4, and may still be stored; its resend is stored once.

An answer of 4 means "not acknowledged; a resend is safe", not "not stored". SQLite writes a
transaction's frames to the WAL, then fdatasyncs it; when that fdatasync fails the COMMIT fails
and the batch is answered 4, but the frames are whole in the WAL file. The running server never
sees them (the next commit writes over them), yet if it dies before that commit, the next open
of the database recovers the WAL and replays them: the packet answered 4 is stored. The resend
the terminal makes is then a duplicate, answered 0 and not stored twice.

The fault is real: strace attaches to the running server and makes every fdatasync and fsync
return EIO (`-e inject=...:error=EIO`), the kernel never running them.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from serverproc import free_port, send, start_server, stop
from test_faults import OK, OVERLOADED, store_contents

from dtgserver.testing import dtg_bytes

pytestmark = pytest.mark.slow


def attached(pid: int) -> bool:
    """Every thread of `pid` is traced."""
    tracers = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        tracers.append(next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1])
    return all(tracer != "0" for tracer in tracers)


async def test_a_packet_answered_4_after_a_failed_fdatasync_can_be_stored_and_its_resend_is_stored_once(
        tmp_path: Path) -> None:
    strace = shutil.which("strace")
    assert strace, "strace is needed (apt-get install strace; .ci/run installs it)"
    port = free_port()
    before, faulted = dtg_bytes(minute=0), dtg_bytes(minute=1)
    process = await start_server(tmp_path, port)
    tracer = None
    try:
        assert await send(port, before) == OK  # the WAL and every connection are open
        tracer = subprocess.Popen([strace, "-f", "-qq", "-p", str(process.pid), "-e", "trace=fdatasync,fsync",
                                   "-e", "inject=fdatasync,fsync:error=EIO", "-o", str(tmp_path / "trace")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with trio.fail_after(20):
            while not attached(process.pid):
                assert tracer.poll() is None, tracer.stderr.read().decode() if tracer.stderr else ""
                await trio.sleep(0.05)
        assert await send(port, faulted) == OVERLOADED
        assert "EIO (Input/output error) (INJECTED)" in (tmp_path / "trace").read_text()
    finally:
        code, log = stop(process, signal.SIGKILL)  # dies before its next commit, as a crash would
        if tracer is not None:
            tracer.wait(timeout=30)
            assert tracer.stderr
            tracer.stderr.close()
    assert code == -signal.SIGKILL
    assert "commit of 1 packets failed, answering 4: disk I/O error" in log, log

    rows, integrity = store_contents(tmp_path)  # opening the database recovers the WAL
    assert integrity == "ok"
    assert rows.count(faulted) == 1, "the packet answered 4 is stored: its frames were whole in the WAL"

    process = await start_server(tmp_path, port)
    try:
        assert await send(port, faulted) == OK  # the terminal's resend: a duplicate
    finally:
        code, log = stop(process)
    assert code == 0, log
    rows, integrity = store_contents(tmp_path)
    assert integrity == "ok"
    assert sorted(rows) == sorted([before, faulted])  # each once
