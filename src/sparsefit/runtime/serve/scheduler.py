"""The loop that owns the engine: it takes submissions and cancellations from a thread-safe inbox,
steps the engine while any request is live (continuous batching: requests join and leave between
steps), and hands each request's events to its asyncio queue on the server's loop.

The engine is not thread-safe, so nothing else touches it. `run()` is called from the thread that
loaded the model (the server's main thread; uvicorn's event loop runs in another): the kernels'
OpenMP team belongs to that thread, and a second thread driving them would start a second team,
which makes libgomp throttle its spin-waits to fit the cores and costs every parallel region a
sleep and a wake-up (measured: a decode step in a fresh thread ran at ~0.6x the speed of the same
step in the loading thread). The number of live requests (running plus waiting) is bounded: past
the bound `submit` raises `QueueFull` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sparsefit.runtime.engine import Engine, Event, Request

log = logging.getLogger("sparsefit.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


class Stopping(Exception):
    """The server is shutting down."""


@dataclass
class Failure:
    """A request the scheduler could not finish: the HTTP status and message to answer with."""

    status: int
    message: str


@dataclass
class Ticket:
    """A request's handle on the server's side: its events arrive on `queue`, in the loop's thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    rid: int | None = None  # the engine's id, once the scheduler has submitted it
    last_token: float | None = None
    tokens: int = 0
    done: bool = False

    def put(self, item: Event | Failure) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[Event | Failure]:
        """The request's events up to its last one; a `Failure` ends it early."""
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, Failure) or item.finish_reason:
                return


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sparsefit_http_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.finished = Counter("sparsefit_requests_finished", "generation requests ended, by how", ["reason"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("sparsefit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated = Counter("sparsefit_generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("sparsefit_requests_running", "requests holding a slot", registry=r)
        self.waiting = Gauge("sparsefit_requests_waiting", "requests waiting for a slot (queue length)", registry=r)
        buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
        self.ttft = Histogram("sparsefit_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=buckets, registry=r)  # fmt: skip
        self.itl = Histogram("sparsefit_inter_token_latency_seconds", "between a request's successive tokens",
                             buckets=buckets, registry=r)  # fmt: skip
        self.latency = Histogram("sparsefit_request_duration_seconds", "from arrival to the last token",
                                 buckets=buckets, registry=r)  # fmt: skip


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_live = len(engine.rows) + max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # submitted and not yet ended (under _lock)
        self._stopping = False
        self._tickets: dict[int, Ticket] = {}  # engine id -> ticket: the loop's thread's alone
        self.running = 0  # published by the scheduler's thread after each step
        self._ended = threading.Event()

    @property
    def live(self) -> int:
        return self._live

    @property
    def waiting(self) -> int:
        return max(0, self._live - self.running)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, end the live ones with a 503, and wait (up to `timeout` s) for `run` to return."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop", None, None))
        self._ended.wait(timeout)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Ticket:
        with self._lock:
            if self._stopping:
                raise Stopping
            if self._live >= self.max_live:
                raise QueueFull
            self._live += 1
        ticket = Ticket(loop)
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        self._inbox.put(("submit", ticket, request))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request whose client went away (a no-op once it has ended)."""
        if not ticket.done:
            self._inbox.put(("cancel", ticket, None))

    # The methods of the thread that runs the loop.

    def run(self) -> None:
        """Serve until `stop`: call from the thread that loaded the model (see the module docstring)."""
        try:
            self._loop()
        finally:
            self._ended.set()

    def _loop(self) -> None:
        stop = False
        while not stop:
            messages = []
            if not self.engine.busy:  # idle: sleep until something arrives (waking now and then for signals)
                try:
                    messages.append(self._inbox.get(timeout=0.5))
                except queue.Empty:
                    continue
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, ticket, request in messages:
                if kind == "submit":
                    self._submit(ticket, request)
                elif kind == "cancel" and ticket.rid in self._tickets:
                    self.engine.cancel(ticket.rid)
                    self._end(ticket, "cancelled")
                elif kind == "stop":
                    stop = True
            if stop:
                self._fail_all(503, "the server is shutting down; retry on another server or later")
            elif self.engine.busy:
                self._step()
            self.running = self.engine.running
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)

    def _submit(self, ticket: Ticket, request: Request) -> None:
        try:
            ticket.rid = self.engine.submit(request)
        except ValueError as err:  # the server checks lengths first: this is a safety net
            ticket.put(Failure(400, str(err)))
            self._end(ticket, "error")
            return
        self._tickets[ticket.rid] = ticket

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
            log.exception("decode step failed")
            self._fail_all(500, f"the decode step failed ({type(err).__name__}: {err})")
            return
        now = time.perf_counter()
        for event in events:
            ticket = self._tickets.get(event.request)
            if ticket is None:
                continue
            n = len(event.tokens)
            self.metrics.generated.inc(n)
            if ticket.last_token is None:
                self.metrics.ttft.observe(now - ticket.submitted)
            else:
                self.metrics.itl.observe(now - ticket.last_token)
            ticket.last_token, ticket.tokens = now, ticket.tokens + n
            ticket.put(event)
            if event.finish_reason:
                self.metrics.latency.observe(now - ticket.submitted)
                self._end(ticket, event.finish_reason)

    def _fail_all(self, status: int, message: str) -> None:
        for ticket in list(self._tickets.values()):
            self.engine.cancel(ticket.rid)
            ticket.put(Failure(status, message))
            self._end(ticket, "error")

    def _end(self, ticket: Ticket, reason: str) -> None:
        self._tickets.pop(ticket.rid, None)
        ticket.done = True
        self.metrics.finished.labels(reason).inc()
        with self._lock:
            self._live -= 1
