"""XID events: the driver's critical errors (e.g. 79, "GPU has fallen off the bus"), per GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pynvml

from .nvml import NvmlLibrary, handle_key, query
from .readings import NotAvailable


class XidWatcher:
    """Collects XID events of the given devices (handle -> GPU index).

    In "thread" mode a thread of its own blocks in nvmlEventSetWait, so events are taken as
    they come, whatever the sampling does; in "poll" mode the sampling tick drains them
    (simulations with many nodes in one process: a thread per simulated node would not
    scale).
    """

    WAIT_MS = 500
    POLL_LIMIT = 1000  # events drained per tick at most: a storm cannot hold the tick forever

    def __init__(
        self, lib: NvmlLibrary, devices: Iterable[tuple[Any, int]], *, clock: Callable[[], float]
    ):
        self._lib = lib
        self._clock = clock
        devices = list(devices)
        self._handles = [handle for handle, _ in devices]
        self._by_handle = {handle_key(handle): index for handle, index in devices}
        self._pending: dict[int, list[tuple[int, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set: Any = None
        self.unavailable: NotAvailable | None = None

    def start(self, *, thread: bool) -> None:
        event_set = query(self._lib.nvmlEventSetCreate)
        if isinstance(event_set, NotAvailable):
            self.unavailable = event_set
            return
        self._set = event_set
        registered = 0
        for handle in self._handles:
            got = query(
                self._lib.nvmlDeviceRegisterEvents,
                handle,
                pynvml.nvmlEventTypeXidCriticalError,
                event_set,
            )
            registered += not isinstance(got, NotAvailable)
        if not registered:
            self.unavailable = NotAvailable("xid events not supported")
            return
        if thread:
            self._thread = threading.Thread(target=self._run, name="gputally-xid", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wait(self.WAIT_MS)

    def _wait(self, timeout_ms: int) -> bool:
        started = time.monotonic()
        try:
            data = self._lib.nvmlEventSetWait_v2(self._set, timeout_ms)
        except pynvml.NVMLError:
            # A timeout, or the driver going away. Never spin: wait out the rest of the period.
            rest = timeout_ms / 1000.0 - (time.monotonic() - started)
            if rest > 0:
                self._stop.wait(rest)
            return False
        index = self._by_handle.get(handle_key(data.device))
        if index is not None and data.eventType == pynvml.nvmlEventTypeXidCriticalError:
            with self._lock:
                self._pending.setdefault(index, []).append((int(data.eventData), self._clock()))
        return True

    def poll(self) -> None:
        if self._set is None:
            return
        for _ in range(self.POLL_LIMIT):
            if not self._wait(0):
                return

    def take(self, index: int) -> list[tuple[int, float]]:
        """The events of GPU `index` since the last take, as (XID, unix time)."""
        with self._lock:
            return self._pending.pop(index, [])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.WAIT_MS / 1000.0 * 4)
        if self._set is not None:
            query(self._lib.nvmlEventSetFree, self._set)
            self._set = None
