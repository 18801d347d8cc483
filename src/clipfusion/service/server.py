"""Running the service on uvicorn with a drain before it stops.

uvicorn alone, on SIGTERM, closes its listening socket at once: a request that arrives a moment later
finds no server, and clients on kept-alive connections see them closed under them.  Here the first
SIGTERM (or Ctrl-C) starts a drain instead: /readyz turns 503 (a load balancer stops sending), every
new request is answered 503 ``shutting_down`` with ``Connection: close`` and ``Retry-After`` (each answer
also closes its connection, so clients reconnect elsewhere), the requests already accepted finish (their
inspections are recorded) and clients, told to retry later, stop arriving.  Then the port is closed
(a new connection is refused, plainly), the connections already accepted get their 503 for a moment
longer (closing one whose request is still unread would reset it), and only then does uvicorn's own
graceful shutdown run.  The drain lasts until no request is in flight and none arrived for QUIET
seconds, or at most ``drain_limit`` seconds; a second signal stops at once (as uvicorn does).

A client that ignores ``Retry-After`` and reconnects at the very moment the port closes can still
meet a reset: the kernel resets the connections waiting in a closed socket's backlog.
"""
from __future__ import annotations

import asyncio
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from clipfusion.errors import ClipfusionError
from clipfusion.service.state import ServiceState

QUIET = 0.3  # seconds without a new request before the port closes
LAST_ANSWERS = 0.3  # seconds between closing the port and shutting down: accepted connections get their 503


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal drains the service before shutting down."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_limit: float) -> None:
        super().__init__(config)
        self.state, self.drain_limit = state, drain_limit
        self.drain_signal: int | None = None
        self.drain_until = 0.0
        self.closed_at: float | None = None  # when the listening sockets were closed
        self.refused: ClipfusionError | None = None  # why the service did not start

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_signal is None:
            self.drain_signal, self.drain_until = sig, time.monotonic() + self.drain_limit
            self.state.draining = True
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's shutdown now

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """The database and the models open before uvicorn's own start-up (and before the port listens), so
        that a model that cannot be served (weights missing, refused by its self-check) ends the service
        with its one-line error (:func:`run` raises it), never a start-up traceback."""
        try:
            await asyncio.to_thread(self.state.open)
        except ClipfusionError as exc:
            self.refused, self.should_exit = exc, True
            return
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: move the drain on (accepted requests finished → port closed → shut down)."""
        now = time.monotonic()
        if self.drain_signal is not None and not self.should_exit:
            quiet = self.state.in_flight == 0 and now - self.state.last_arrival >= QUIET
            drained = quiet or now > self.drain_until
            if drained and self.closed_at is None:
                for listening in self.servers:
                    listening.close()
                self.closed_at = now
            elif drained and self.closed_at is not None and now - self.closed_at >= LAST_ANSWERS:
                super().handle_exit(self.drain_signal, None)  # uvicorn exits by this signal, as it would have
        return await super().on_tick(counter)


def run(app: FastAPI, host: str, port: int, log_config: dict[str, object], drain_limit: float) -> None:
    """Serve ``app`` (made by ``create_app``) until a signal, then drain (at most ``drain_limit`` seconds)
    and stop."""
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config, access_log=False)
    server = DrainingServer(config, app.state.service, drain_limit)
    server.run()
    if server.refused is not None:
        raise server.refused
