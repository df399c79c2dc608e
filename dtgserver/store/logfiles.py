"""Status log files: `DIR/logs/<modem>/<send time>.log`, written durably before the packet's commit.

The packet store (store/packets.py) calls `write_status_log` for each new status log of a batch,
in its worker thread, before COMMIT, so that an answer of 0 implies the file is on disk:

- Its bytes: written under a temporary name, fsynced, then renamed into place (a file under a
  `.log` name is always whole, even after a SIGKILL halfway through the write).
- Its directory entry: `logs/<modem>` is fsynced after every file written or reused.
- The directories above it: `logs/<modem>` in `logs`, and `logs` in DIR, are fsynced when this
  process created them or has not yet seen them durable (a directory left by a failed commit, or
  by another process or an earlier run); then remembered, so that a log costs two fsyncs, not four.

Nothing is followed out of DIR: `logs`, `logs/<modem>` and the file are opened relative to the
directory above them with `O_NOFOLLOW`, and a symbolic link (or anything but a directory or a
regular file) at any of them fails the write with `UnsafeLogPath`, naming it; the packet store
then fails the commit and answers 4, logging that error.

The name is a function of the log alone, never of the files already there, so that a log costs
the same however many share its send time: the first log of a send time is `<send time>.log`; a
different log with the same send time is `<send time>_<h>.log`, `h` the first 16 hex digits of
the SHA-256 of its UTF-8 bytes. At most those two files are read. A resend finds its own bytes
under one of the two names and reuses that file (made durable again, as above).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from ..protocol import BadTime, StatusLog

SUFFIX_DIGITS = 16  # hex digits of sha256(file bytes) after `_` in a second log's name
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO never blocks the open
_DIRECTORY = _READ | os.O_DIRECTORY

# Directories whose entry in their parent this process has fsynced, by (st_dev, st_ino), each with a
# descriptor held open: while it is open the inode cannot be freed, so no directory made later can
# have its number and pass for one already durable. The least recently used are let go beyond
# _REMEMBERED (and their parent is fsynced again the next time).
_REMEMBERED = 64
_durable_dirs: OrderedDict[tuple[int, int], int] = OrderedDict()
_durable_lock = threading.Lock()  # one writer thread per shard; shards may share a process


class UnsafeLogPath(OSError):
    """A symbolic link, or not a directory / regular file, where a status log path goes: not written."""

    def __str__(self) -> str:
        return str(self.strerror)  # the path and the reason, for the commit's error line; no "[Errno 40]"


def status_log_path(data_dir: Path, record: StatusLog) -> Path:
    """logs/<modem>/<send time>.log, built from validated digits only: a log's first-choice name."""
    modem = str(record.modem)
    if not modem.isascii() or not modem.isdigit():  # the framer guarantees this; never trust a path
        raise ValueError(f"modem {modem!r} is not digits")
    t = record.sent_time
    if isinstance(t, BadTime):
        stamp = "".join(f"{b:03d}" for b in t.raw)
    else:
        stamp = f"{t:%Y%m%d%H%M%S}{t.microsecond // 10000:02d}"
    return data_dir / "logs" / modem / f"{stamp}.log"


def second_name(path: Path, encoded: bytes) -> str:
    """The name of a different log with the same send time as the one at `path`."""
    return f"{path.stem}_{hashlib.sha256(encoded).hexdigest()[:SUFFIX_DIGITS]}{path.suffix}"


def write_status_log(data_dir: Path, record: StatusLog) -> Path:
    """Write one status log's file durably; returns the path written (or reused)."""
    return _write_durably(status_log_path(data_dir, record), str(record.log))


def _write_durably(path: Path, text: str) -> Path:
    """Write `text` at `path` (DIR/logs/<modem>/<name>.log) or its second name, durably; never overwrite.

    Raises OSError (UnsafeLogPath for a symbolic link) when it is not on disk; no partial file is left.
    """
    encoded = text.encode("utf-8")
    data_dir, modem = path.parent.parent.parent, path.parent.name
    root = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # DIR itself is the operator's
    try:
        logs = _subdirectory(root, "logs", data_dir)
        try:
            folder = _subdirectory(logs, modem, data_dir / "logs")
            try:
                name = _place(folder, path, encoded)
                os.fsync(folder)  # the file's entry
            finally:
                os.close(folder)
        finally:
            os.close(logs)
    finally:
        os.close(root)
    return path.with_name(name)


def _subdirectory(parent: int, name: str, shown: Path) -> int:
    """Open `parent`/`name` (made if missing) without following a link; its entry in `parent` on disk."""
    created = False
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        fd = _open_directory(parent, name, shown)
    except OSError as e:
        raise _unsafe(e, parent, name, shown, "a directory") from e
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if created or not _known_durable(key):
            os.fsync(parent)  # created now, or by a commit that failed before this fsync, or by another process
            _remember(key, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _known_durable(key: tuple[int, int]) -> bool:
    with _durable_lock:
        if key in _durable_dirs:
            _durable_dirs.move_to_end(key)
            return True
    return False


def _remember(key: tuple[int, int], fd: int) -> None:
    with _durable_lock:
        if key in _durable_dirs:
            return
        _durable_dirs[key] = os.dup(fd)
        while len(_durable_dirs) > _REMEMBERED:
            os.close(_durable_dirs.popitem(last=False)[1])


def _open_directory(parent: int, name: str, shown: Path) -> int:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except OSError as e:
        raise _unsafe(e, parent, name, shown, "a directory") from e


def _unsafe(error: OSError, parent: int, name: str, shown: Path, expected: str) -> OSError:
    """The error to raise for a failed open of `parent`/`name`: UnsafeLogPath when a link or the wrong type."""
    if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
        return error
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return error
    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else f"not {expected}"
    return UnsafeLogPath(error.errno, f"{shown / name} is {what}: status logs are written only inside the "
                                      "data dir, in real directories; not written")


def _place(folder: int, path: Path, encoded: bytes) -> str:
    """The name in `folder` now holding exactly `encoded`, durably: an existing one reused, or a new file."""
    for name in (path.name, second_name(path, encoded)):
        held = _read(folder, name, len(encoded), path.with_name(name))
        if held is None:
            _create(folder, name, encoded)
            return name
        content, fd = held
        try:
            if content == encoded:
                os.fsync(fd)  # left by a commit that failed: its bytes may never have reached the disk
                return name
        finally:
            os.close(fd)
    # Only a rename puts bytes under these names, and the second carries their digest.
    raise OSError(errno.EEXIST, f"{path.with_name(name)} exists and holds other bytes; not overwritten")


def _read(folder: int, name: str, size: int, shown: Path) -> tuple[bytes, int] | None:
    """What the regular file `name` holds (up to `size` + 1 bytes) and an open descriptor, or None if missing."""
    try:
        fd = os.open(name, _READ, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _unsafe(e, folder, name, shown.parent, "a regular file") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeLogPath(errno.EEXIST, f"{shown} is not a regular file; not written")
        chunks, left = [], size + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except BaseException:
        os.close(fd)
        raise
    return b"".join(chunks), fd


def _create(folder: int, name: str, encoded: bytes) -> None:
    """Write `encoded` to a temporary file, fsync it, rename it to `name` (which does not exist)."""
    temporary = f"{name[:-len('.log')]}.tmp"
    try:
        os.unlink(temporary, dir_fd=folder)  # left by a process killed halfway through a write
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=folder)
    try:
        try:
            data = memoryview(encoded)
            while data:  # a write can be short (a full disk, a file size limit): the rest, or an error
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=folder)  # the commit fails with this error: leave no half log behind
        except OSError:
            pass
        raise
