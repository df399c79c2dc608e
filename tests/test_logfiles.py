"""Status log files (store/logfiles.py): durable to the data dir, never through a link, constant cost."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_server import OK, OVERLOADED, exchange, running, stored

from dtgserver.protocol import encode
from dtgserver.store.logfiles import UnsafeLogPath, write_status_log
from dtgserver.testing import status_log

MODEM = "01055556666"
NAME = "2026112108000000.log"  # status_log()'s send time


def second(text: str) -> str:
    return f"2026112108000000_{hashlib.sha256(text.encode()).hexdigest()[:16]}.log"


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The real os.fsync, recording the path of each descriptor it is given."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield paths


# -- every answer of 0: the file, its entry and the directories above it on disk (issue 15, item 2) ----


def test_a_new_log_fsyncs_its_file_and_every_directory_up_to_the_data_dir(tmp_path: Path,
                                                                          fsynced: list[str]) -> None:
    path = write_status_log(tmp_path, status_log(MODEM, "첫 로그"))
    assert path == tmp_path / "logs" / MODEM / NAME and path.read_text("utf-8") == "첫 로그"
    folder = tmp_path / "logs" / MODEM
    assert sorted(fsynced[:2]) == [str(tmp_path), str(tmp_path / "logs")]  # the entries of logs and logs/<modem>
    assert fsynced[2:] == [str(path.with_suffix(".tmp")), str(folder)]  # its bytes, then (renamed) its entry


def test_a_file_left_by_a_failed_commit_is_made_durable_when_reused(tmp_path: Path, fsynced: list[str]) -> None:
    folder = tmp_path / "logs" / MODEM
    folder.mkdir(parents=True)  # as a commit leaves them that failed before any fsync
    (folder / NAME).write_text("같은 로그", "utf-8")
    assert write_status_log(tmp_path, status_log(MODEM, "같은 로그")) == folder / NAME
    assert sorted(p.name for p in folder.iterdir()) == [NAME]  # reused, no second file
    assert {str(folder / NAME), str(folder), str(tmp_path / "logs"), str(tmp_path)} <= set(fsynced), fsynced


def test_a_directory_whose_fsync_failed_is_fsynced_again_by_the_resend(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:  # EIO once, on the data dir: the fsync that makes `logs` durable
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(path)
        if path == str(tmp_path) and calls.count(path) == 1:
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    record = status_log(MODEM, "재전송")
    with pytest.raises(OSError, match="injected"):
        write_status_log(tmp_path, record)
    write_status_log(tmp_path, record)
    assert calls.count(str(tmp_path)) == 2
    assert (tmp_path / "logs" / MODEM / NAME).read_text("utf-8") == "재전송"


def test_a_later_log_fsyncs_only_its_file_and_its_directory(tmp_path: Path, fsynced: list[str]) -> None:
    write_status_log(tmp_path, status_log(MODEM, "one"))
    fsynced.clear()
    path = write_status_log(tmp_path, status_log(MODEM, "two"))
    assert fsynced == [str(path.with_suffix(".tmp")), str(path.parent)]  # the file before its rename


def test_a_half_file_left_by_a_killed_write_is_replaced_and_no_temporary_stays(tmp_path: Path) -> None:
    folder = tmp_path / "logs" / MODEM
    folder.mkdir(parents=True)
    (folder / "2026112108000000.tmp").write_bytes(b"half")  # SIGKILL between write and rename
    write_status_log(tmp_path, status_log(MODEM, "whole"))
    assert {p.name: p.read_text() for p in folder.iterdir()} == {NAME: "whole"}


# -- never through a link out of DIR (issue 15, item 3) ------------------------------------------------


def link_logs(data_dir: Path, outside: Path) -> None:
    (data_dir / "logs").symlink_to(outside, target_is_directory=True)


def link_modem(data_dir: Path, outside: Path) -> None:
    (data_dir / "logs").mkdir()
    (data_dir / "logs" / MODEM).symlink_to(outside, target_is_directory=True)


def link_file(data_dir: Path, outside: Path) -> None:
    (data_dir / "logs" / MODEM).mkdir(parents=True)
    (data_dir / "logs" / MODEM / NAME).symlink_to(outside / "passwd")  # dangling: would be created


def file_for_logs(data_dir: Path, outside: Path) -> None:
    (data_dir / "logs").write_text("not a directory")


def fifo_for_file(data_dir: Path, outside: Path) -> None:
    (data_dir / "logs" / MODEM).mkdir(parents=True)
    os.mkfifo(data_dir / "logs" / MODEM / NAME)


@pytest.mark.parametrize(("plant", "where", "what"), [
    (link_logs, "logs", "a symbolic link"),
    (link_modem, f"logs/{MODEM}", "a symbolic link"),
    (link_file, f"logs/{MODEM}/{NAME}", "a symbolic link"),
    (file_for_logs, "logs", "not a directory"),
    (fifo_for_file, f"logs/{MODEM}/{NAME}", "not a regular file"),
])
def test_a_link_or_a_wrong_kind_of_file_is_refused_and_named(tmp_path: Path, plant: Callable[[Path, Path], None],
                                                             where: str, what: str) -> None:
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    data_dir.mkdir()
    outside.mkdir()
    plant(data_dir, outside)
    with pytest.raises(UnsafeLogPath) as caught:
        write_status_log(data_dir, status_log(MODEM, "밖으로"))
    assert f"{data_dir / where} is {what}" in str(caught.value)
    assert list(outside.iterdir()) == []


async def test_a_linked_logs_directory_answers_4_logs_why_and_a_resend_is_stored_once_it_is_gone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "dtgserver.store")
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    data_dir.mkdir()
    outside.mkdir()
    link_logs(data_dir, outside)
    packet = encode(status_log(MODEM, "링크"))
    async with running(data_dir) as server:
        assert server.port
        assert await exchange(server.port, packet) == OVERLOADED
        assert list(outside.iterdir()) == []
        assert f"answering 4: {data_dir / 'logs'} is a symbolic link" in caplog.text
        assert "answering 4" in caplog.text
        (data_dir / "logs").unlink()
        assert await exchange(server.port, packet) == OK
    assert [raw for _, _, raw in stored(data_dir)] == [packet]
    assert (data_dir / "logs" / MODEM / NAME).read_text("utf-8") == "링크"


# -- one log costs the same however many share its send time (issue 15, item 11) -------------------------


def opens_for(data_dir: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    real, count = os.open, [0]

    def counting(*args: object, **kwargs: object) -> int:
        count[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", counting)
        path = write_status_log(data_dir, status_log(MODEM, text))
    return path, count[0]


def test_a_log_opens_as_many_files_with_200_logs_of_its_send_time_as_with_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    few, many = tmp_path / "few", tmp_path / "many"
    for data_dir, earlier in ((few, 1), (many, 200)):
        data_dir.mkdir()
        for k in range(earlier):
            write_status_log(data_dir, status_log(MODEM, f"earlier {k}"))
    assert len(list((many / "logs" / MODEM).iterdir())) == 200
    path_few, opens_few = opens_for(few, "the new one", monkeypatch)
    path_many, opens_many = opens_for(many, "the new one", monkeypatch)
    assert opens_many == opens_few
    assert path_few.name == path_many.name == second("the new one")  # named by its bytes, not by a count
    assert opens_for(many, "the new one", monkeypatch) == (path_many, opens_many - 1)  # the resend: no new file
    assert len(list((many / "logs" / MODEM).iterdir())) == 201
