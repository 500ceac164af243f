"""One run per output directory: the run's main process holds `.psipo-lock` in it for as long as it runs.

The lock is an advisory `flock` on that file, which the kernel releases when its holder dies, however it dies, so
a killed run never leaves a lock that blocks the next one. The file also says who holds it (pid, host, since when,
and every process of the job), so a second run into the directory is refused with a line naming the holder, and a
run that finds a holder's details but no lock knows it replaces a killed one (stale lock, taken over with a note).
On a filesystem without `flock` (some network mounts) the details alone decide: a holder on this host is checked by
pid; a holder on another host is trusted, and the line says which file to delete if that run is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError

LOCK_FILE = ".psipo-lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass
class RunLock:
    """The held lock: its file, its open descriptor and what it says."""

    path: Path
    fd: int
    holder: dict[str, Any] = field(default_factory=dict)

    def describe(self, processes: list[dict[str, Any]]) -> None:
        """Record every process of the job (rank, host, pid) in the lock, for the user and for `processes`."""
        self.holder["processes"] = processes
        _write(self.fd, self.holder)

    def release(self) -> None:
        """Empty the file (an empty lock is a free one) and unlock it."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.close(self.fd)


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict[str, Any]) -> None:
    data = json.dumps(holder).encode("utf-8")
    os.pwrite(fd, data, 0)  # then cut: a reader never finds the file empty while it is rewritten
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _who(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the holder's pid runs on this host (used only where the filesystem has no locks)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: trust it
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def refuse_if_held(run_dir: Path) -> None:
    """Raise the UserError naming the live run that holds `run_dir`, if one does (a probe: nothing is kept)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _take(fd, path, fcntl.LOCK_SH)  # shared: every process of a job may probe at once, only a holder conflicts
    finally:
        os.close(fd)  # closing the descriptor lets go of the probe's lock


def acquire(run_dir: Path) -> RunLock:
    """Hold `run_dir`'s lock (creating the directory) or raise a UserError naming the live run that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous = _take(fd, path)
    except BaseException:
        os.close(fd)
        raise
    if previous:
        print(f"note: output.dir: the run that held it ({_who(previous)}) is gone; taking over", file=sys.stderr)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": secrets.token_hex(8),  # lets every process check that it sees this very file (`processes`)
    }
    _write(fd, holder)
    return RunLock(path, fd, holder)


def _take(fd: int, path: Path, mode: int = fcntl.LOCK_EX) -> dict[str, Any]:
    """Lock `fd` (`mode`: exclusive, or shared for a probe); the details a previous holder left (stale) or {}."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(
            f"{path.parent} is in use by a running job ({_who(_read(fd))}); wait for it to end or choose another "
            "output.dir",
            where="output.dir",
        ) from None
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        holder = _read(fd)
        if holder and _alive_here(holder):
            raise UserError(
                f"{path.parent} is in use by {_who(holder)} (this filesystem has no locks: if that run is gone, "
                f"delete {path})",
                where="output.dir",
            ) from None
        return holder
    return _read(fd)
