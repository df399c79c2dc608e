"""Status log files: `DIR/logs/<modem>/<send time>.log`, written durably before the packet's commit.

The packet store (store/packets.py) calls `write_status_log` for each new status log of a batch,
in its worker thread, before COMMIT: the file is on disk before the packet is answered 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..protocol import BadTime, StatusLog


def status_log_path(data_dir: Path, record: StatusLog) -> Path:
    """logs/<modem>/<send time>.log, built from validated digits only."""
    modem = str(record.modem)
    if not modem.isascii() or not modem.isdigit():  # the framer guarantees this; never trust a path
        raise ValueError(f"modem {modem!r} is not digits")
    t = record.sent_time
    if isinstance(t, BadTime):
        stamp = "".join(f"{b:03d}" for b in t.raw)
    else:
        stamp = f"{t:%Y%m%d%H%M%S}{t.microsecond // 10000:02d}"
    return data_dir / "logs" / modem / f"{stamp}.log"


def _write_durably(path: Path, text: str) -> Path:
    """Write a new file (never overwrite: a second log with the same send time gets a suffix) and fsync it.

    A file that already holds exactly this text is this log, written before a commit that then
    failed; the terminal's resend reuses it instead of leaving a `_1` copy.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 0
    encoded = text.encode("utf-8")
    while True:
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                if candidate.read_bytes() == encoded:
                    return candidate
            except OSError:
                pass
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    try:
        data = memoryview(encoded)
        while data:  # a write can be short (a full disk, a file size limit): the rest, or an error
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        candidate.unlink(missing_ok=True)  # the commit fails with this error: leave no half log behind
        raise
    finally:
        os.close(fd)
    dir_fd = os.open(candidate.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return candidate


def write_status_log(data_dir: Path, record: StatusLog) -> Path:
    """Write one status log's file durably; returns the path written (or reused)."""
    return _write_durably(status_log_path(data_dir, record), str(record.log))
