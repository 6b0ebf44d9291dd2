"""Keep the leases of live ``llm_call`` blocks alive, so only dead workers lose their holds.

A hold is a lease: if its worker dies, the hold frees itself after ``lease_ttl``.
A call that is still running when its lease would run out (a long generation)
must renew it, or the budget it holds would be given to other calls while it is
still spending. One daemon thread per process renews, at a third of their TTL, the
holds of every open ``llm_call`` block and of every reservation its owner handed
over with `Reservation.keep_alive` (the framework adapters do); a settled or
released reservation leaves it. A raw `Budget.reserve` is otherwise not tracked:
its owner renews it (`Reservation.renew`). If the process dies, so does the
thread, and the leases run out. A reservation kept alive from a coroutine stops being renewed
when its task ends (a streamed call may settle from another task, before its lease runs out),
and is charged its estimate at once if that task was cancelled (LangChain sends a call cancelled
with its task no end or error event; the provider may already be billing it); the task's end
wakes the keeper.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budgetary.core.budget import Reservation

__all__ = ["keeper"]


class _LeaseKeeper:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """A fresh keeper: at import, and in a forked child, which has the parent's state but not its thread."""
        # Plain dict operations are atomic under the GIL; the hot path takes no lock.
        self.live: dict[str, Reservation] = {}
        """Live reservations by hold id (open ``llm_call`` blocks, `Reservation.keep_alive`); callers add
        and remove them directly (hot path), then `poke` if their lease is shorter than ``ttl_floor``."""
        self.ttl_floor = float("inf")
        """Leases shorter than this need `poke` after being added (the keeper would sleep too long)."""
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        # Tasks whose end wakes the keeper (one done-callback per task, however many calls it makes).
        self._watched: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()

    def watch(self, task: asyncio.Task[object]) -> None:
        """Wake the keeper when ``task`` ends, to release what it kept alive and left unsettled."""
        if task not in self._watched:
            self._watched.add(task)
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[object]) -> None:
        self.poke()  # starts the keeper if need be; a plain Event.set otherwise: safe on the loop

    def poke(self) -> None:
        """Start the keeper, or wake it to re-plan after a shorter lease was added."""
        if self._thread is None:
            self._start()
        else:
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="budgetary-lease-keeper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            live = list(self.live.values())
            interval = max(min((r.ttl for r in live), default=60.0) / 3, 0.05)
            self.ttl_floor = interval * 3
            for reservation in live:
                task = reservation._task  # set by keep_alive when called from a coroutine
                if task is not None and task.done():
                    self.live.pop(reservation.hold_id, None)  # no more renewals: the lease runs out...
                    if task.cancelled():  # ...unless the call was abandoned in flight: charge it now
                        try:
                            reservation._charge_if_open()  # its parent run may be closing it too
                        except Exception:  # a store hiccup: the lease runs out instead
                            pass
                    continue
                if not reservation.done and reservation.lease_age() >= reservation.ttl / 3:
                    try:
                        reservation.renew()
                    except Exception:  # a store hiccup: the next round retries before the lease runs out
                        continue
            self._wake.wait(interval)
            self._wake.clear()


keeper = _LeaseKeeper()
os.register_at_fork(after_in_child=keeper._reset)
