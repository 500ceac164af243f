"""The processes of a multi-process run: who they are, whether they share the run directory, and which one died.

At start every process reports (rank, host, pid); the main process records them in the run's lock file. Each then
reads the lock file back: a process that does not find the main process's token there writes to another disk (a
multi-node run whose output.dir is not on a shared filesystem), which would otherwise surface as a hang or a
missing checkpoint at resume, so the run stops at once with one line naming the hosts.

When a process dies (killed, out of memory, a crashed node), the launcher sends the others SIGTERM and their next
collective fails. A survivor then finds which process is gone (a pid on its own host that no longer runs) and
stops with one line: which rank died, the newest complete checkpoint, and how to resume.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psipo_cli.errors import EXIT_PROCESS_DIED, RunStopped, UserError
from psipo_cli.run.checkpoints import newest_complete
from psipo_cli.run.lock import LOCK_FILE, RunLock
from psipo_cli.training.distributed import world


def _gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (just `[value]` in a single process)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _from_main(value: Any) -> Any:
    """The main process's `value`, on every process."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_on_error(error: UserError | None) -> None:
    """Raise the main process's error (None: no error) on every process, so all stop before the next collective;
    only the main process prints it."""
    message = _from_main(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message, echo=False)


@dataclass
class Processes:
    """The job's processes and what each knows of the others."""

    run_dir: Path
    rank: int
    peers: list[dict[str, Any]]  # every process: rank, host, pid

    @classmethod
    def register(cls, run_dir: Path, lock: RunLock | None) -> Processes:
        """Collective: learn every process, record them in the lock (main), check every one sees the run dir."""
        rank, _ = world()
        peers = _gather({"rank": rank, "host": socket.gethostname(), "pid": os.getpid()})
        token = _from_main(lock.holder["token"] if lock else None)
        _check_shared(run_dir, token, peers)  # collective: once it returns, every process has read the lock file
        if lock is not None:
            lock.describe(peers)
        return cls(run_dir, rank, peers)

    def dead(self) -> list[dict[str, Any]]:
        """The other processes on this host that are no longer running."""
        here = socket.gethostname()
        return [p for p in self.peers if p["rank"] != self.rank and p["host"] == here and not _running(p["pid"])]

    def died_line(self, step: int, collective_failed: bool) -> str | None:
        """The one line a survivor ends with if another process of the job is gone (or, `collective_failed`, went
        silent on another host); else None."""
        dead, n = self.dead(), len(self.peers)
        if not (dead or (collective_failed and n > 1)):
            return None
        if dead:
            who = ", ".join(f"rank {p['rank']} (pid {p['pid']})" for p in dead)
            cause = f"{who} died near step {step}"
        else:  # a process on another node: its own node's log says why
            cause = f"another process of the job stopped near step {step} (not on this host: see its node's log)"
        return f"{cause}; {newest_complete(self.run_dir)}; continue with --resume and {n} processes"


def _running(pid: int) -> bool:
    """Whether `pid` runs: not gone and not a zombie (a killed child its launcher has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def _check_shared(run_dir: Path, token: str | None, peers: list[dict[str, Any]]) -> None:
    """Collective: every process must see the lock file the main process wrote (the same directory)."""
    try:
        seen = json.loads((run_dir / LOCK_FILE).read_text(encoding="utf-8")).get("token") == token
    except (OSError, ValueError, AttributeError):
        seen = False
    views = _gather(seen)
    blind = sorted({peer["host"] for peer, ok in zip(peers, views, strict=True) if not ok})
    if blind:
        raise UserError(
            f"{run_dir} is not shared by all processes: those on {', '.join(blind)} do not see what the main process "
            f"({peers[0]['host']}) writes there; put output.dir on a filesystem every node mounts",
            where="output.dir",
            echo=world()[0] == 0,  # every process stops; the main one says why
        )


def collective_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because a peer went away (gloo's closed connection, NCCL's error)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo")
    )


def stop_if_a_process_died(processes: Processes | None, step: int, err: BaseException | None = None) -> None:
    """Raise the survivor's line if another process of the job is gone (on a failure `err`, or on a SIGTERM)."""
    failed = err is not None and collective_failure(err)
    line = processes.died_line(step, failed) if processes is not None else None
    if line is not None:
        raise RunStopped(line, EXIT_PROCESS_DIED) from None
