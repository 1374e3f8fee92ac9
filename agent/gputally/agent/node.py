"""One node's agent: a sampler on a fixed cadence feeding a sender, on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from gputally.v1 import telemetry_pb2 as pb

from .sampler import Sampler
from .sender import Sender

log = logging.getLogger("gputally.agent")


class NodeAgent:
    def __init__(
        self,
        sampler: Sampler,
        collector: str,
        *,
        backend_name: str,
        sample_in_thread: bool = True,
        down: Callable[[float], bool] | None = None,
        sender_options: dict[str, Any] | None = None,
        on_report: Callable[[pb.Report], None] | None = None,
    ):
        self.sampler = sampler
        self.collector = collector
        self.backend_name = backend_name
        # Real NVML calls can take milliseconds each; a thread keeps the event loop (and so
        # the stream) responsive. The mock is fast enough to run on the loop itself.
        self.sample_in_thread = sample_in_thread
        self.down = down  # simulated outages: no sampling, no stream
        self._sender_options = sender_options or {}
        self._on_report = on_report  # e.g. the local /metrics exporter
        self.sender = self._new_sender()
        self.reports = 0

    def _new_sender(self) -> Sender:
        # A new instance id per agent life, so the collector never mistakes a restarted
        # agent's sequence numbers for duplicates.
        instance_id = random.getrandbits(63) or 1
        return Sender(
            self.collector,
            lambda: self.sampler.hello(instance_id, self.backend_name),
            on_acked=self._acked,
            prove=self.sampler.signer.prove,
            **self._sender_options,
        )

    def _acked(self, report: pb.Report) -> None:
        """The collector is done with `report`: its summary (if any) was recorded, or refused
        for good, so the spool lets it go."""
        if report.HasField("summary"):
            chain_seq = pb.Summary.FromString(report.summary.body).chain_seq
            try:
                self.sampler.signer.forget(chain_seq)
            except OSError as error:  # the spool is tidied again at the next acknowledgement
                log.warning("cannot tidy the summary spool", extra={"kv": {"error": str(error)}})

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        sender_task: asyncio.Task[None] | None = asyncio.ensure_future(self.sender.run())
        # What a previous run signed but never got acknowledged goes first.
        for report in self.sampler.spooled_reports():
            self.sender.submit(report)
        start = loop.time()
        deadline = None if duration is None else start + duration
        tick = 0
        try:
            while not stop.is_set():
                tick += 1
                due = start + tick * self.sampler.interval
                now = loop.time()
                if due < now - self.sampler.interval:
                    # Fell behind (suspended, overloaded): skip the missed ticks. The gap is
                    # reported as unobserved time by the sampler's interval cap.
                    tick = int((now - start) / self.sampler.interval) + 1
                    due = start + tick * self.sampler.interval
                if deadline is not None and due > deadline + 1e-6:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(due - loop.time(), 0))
                    break
                if self.down is not None and self.down(self.sampler.clock()):
                    if sender_task is not None:
                        self.sender.stop()
                        await sender_task
                        sender_task = None
                        log.info("node down", extra={"kv": {"node": self.sampler.node}})
                    continue
                if sender_task is None:
                    self.sampler.resume()
                    self.sender = self._new_sender()
                    sender_task = asyncio.ensure_future(self.sender.run())
                    log.info("node back", extra={"kv": {"node": self.sampler.node}})
                    continue
                outgoing = (
                    await asyncio.to_thread(self.sampler.tick)
                    if self.sample_in_thread
                    else self.sampler.tick()
                )
                if outgoing is not None:
                    self.sender.submit(outgoing)
                    self.reports += 1
                if self._on_report is not None and self.sampler.last_tick is not None:
                    self._on_report(self.sampler.last_tick)  # every tick's readings
        finally:
            if sender_task is not None:
                # Close the summary window in progress, so its seconds reach the record.
                for report in self.sampler.final_reports():
                    self.sender.submit(report)
                await self.sender.drain(timeout=5.0)
                self.sender.stop()
                await sender_task
