"""Keep the leases of live ``llm_call`` blocks alive, so only dead workers lose their holds.

A hold is a lease: if its worker dies, the hold frees itself after ``lease_ttl``.
A call that is still running when its lease would run out (a long generation)
must renew it, or the budget it holds would be given to other calls while it is
still spending. One daemon thread per process renews the holds of every open
``llm_call`` block at a third of their TTL. A raw `Budget.reserve` is not
tracked: its owner renews it (`Reservation.renew`), as the LangChain handler does
on every streamed token.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budgetary.core.budget import Reservation

__all__ = ["keeper"]


class _LeaseKeeper:
    def __init__(self) -> None:
        # Plain dict operations are atomic under the GIL; the hot path takes no lock.
        self._live: dict[str, Reservation] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._interval = float("inf")

    def track(self, reservation: Reservation) -> None:
        self._live[reservation.hold_id] = reservation
        if self._thread is None:
            self._start()
        elif reservation._budget.lease_ttl / 3 < self._interval:
            self._wake.set()  # the keeper sleeps longer than this lease can wait

    def untrack(self, reservation: Reservation) -> None:
        self._live.pop(reservation.hold_id, None)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="budgetary-lease-keeper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            live = list(self._live.values())
            self._interval = interval = max(min((r.ttl for r in live), default=60.0) / 3, 0.05)
            for reservation in live:
                if not reservation.done and reservation.lease_age() >= reservation.ttl / 3:
                    try:
                        reservation.renew()
                    except Exception:  # a store hiccup: the next round retries before the lease runs out
                        continue
            self._wake.wait(interval)
            self._wake.clear()


keeper = _LeaseKeeper()
