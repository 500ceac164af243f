"""Arms that take turns: each in its own process, one unit of work at a time, in a fixed rotation.

The machine's speed drifts by ±15% over minutes (neighbours, frequency), as much as the effects measured, so arms
timed one after another disagree from run to run. In a race every arm's process is alive at once and the driver
hands out turns (build the trainer, then one training step each, round and round), so a drift hits every arm
alike. The others wait in a blocking read while one works, so nothing competes for the CPU; each process keeps its
own peak RSS. Protocol, over two pipes per arm: the arm writes `STEP` once loaded (ready); then, each turn, the
driver writes `GO`, the arm does one unit and writes `STEP`, or `END` after its last one. An arm that has ended
waits for one more `GO`, the release, sent once every arm has ended: a process printing its result and exiting
would otherwise compete with another arm's last step (it cost that step up to 2× in the first runs).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

GO, STEP, END = b"g", b"s", b"e"


@dataclass
class Turns:
    """The arm's side: wait for a turn, report that it is over."""

    go_fd: int
    done_fd: int

    def wait(self) -> None:
        if os.read(self.go_fd, 1) != GO:
            raise SystemExit("race driver went away")

    def done(self, last: bool = False) -> None:
        os.write(self.done_fd, END if last else STEP)

    def released(self) -> None:
        """After the last turn: wait until every arm has ended (or the driver is gone)."""
        os.read(self.go_fd, 1)


def run_turns(arms: list[Any], settle_s: float = 0.0) -> list[str]:
    """The driver's side: `arms` are objects with `go()`, `done() -> bytes` and `release()`; turns go round until
    every arm has ended, then every arm is released. Returns the order turns were taken in (arm indices as text,
    for tests and the JSON). `settle_s`: a pause between turns, for the last arm's threads to go idle (~40 ms of
    its CPU time was seen after a turn)."""
    active, order = list(range(len(arms))), []
    while active:
        for index in list(active):
            time.sleep(settle_s)
            arms[index].go()
            order.append(str(index))
            if arms[index].done() == END:
                active.remove(index)
    for arm in arms:
        arm.release()
    return order


class PipeArm:
    """A child process's pair of pipes, seen from the driver."""

    def __init__(self) -> None:
        self._go_read, self._go_write = os.pipe()
        self._done_read, self._done_write = os.pipe()

    def child_fds(self) -> tuple[int, int]:
        """(go, done) descriptors to pass to the child (subprocess pass_fds) and name in its spec."""
        return self._go_read, self._done_write

    def started(self) -> None:
        """Close the child's ends here, so a child that dies reads as end of file instead of a hang."""
        os.close(self._go_read)
        os.close(self._done_write)

    def go(self) -> None:
        os.write(self._go_write, GO)

    def release(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # an arm that is already gone needs no release
            os.write(self._go_write, GO)

    def done(self) -> bytes:
        reply = os.read(self._done_read, 1)
        if reply not in (STEP, END):
            raise SystemExit("a bench arm died in its turn (its stderr follows the results)")
        return reply

    def close(self) -> None:
        for fd in (self._go_write, self._done_read):
            with contextlib.suppress(OSError):
                os.close(fd)
