"""uvicorn's connection limits from `ServeConfig`: a cap on connections, an idle (keep-alive) timeout, a size cap
on the request head, and a deadline for the request head, which uvicorn lacks.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection that never finishes
its request head (a slow-loris client: connect, then one header byte every few seconds) is held forever, and
enough of them stop the server. `HeadDeadlineH11` closes a connection whose request line and headers are not
complete `header_timeout_s` after it opened, or after its previous response was sent.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.server.config import ServeConfig

KB = 1024


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late (`header_timeout_s`)."""

    header_timeout_s = 10.0  # set per server by `uvicorn_config` (uvicorn builds the protocol without our args)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a whole request head arrived: its body and answer have their own limits
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head is due in header_timeout_s too (uvicorn's idle timer also runs)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()


def protocol_for(header_timeout_s: float) -> type[HeadDeadlineH11]:
    """HeadDeadlineH11 with this deadline (a subclass: two servers in one process keep their own)."""
    return type("HeadDeadlineH11", (HeadDeadlineH11,), {"header_timeout_s": header_timeout_s})


def uvicorn_options(cfg: ServeConfig) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the connection limits of `cfg`."""
    return {"http": protocol_for(cfg.header_timeout_s), "limit_concurrency": cfg.limit_concurrency,
            "timeout_keep_alive": cfg.timeout_keep_alive_s, "h11_max_incomplete_event_size": cfg.max_header_kb * KB}


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engines load: a busy port or a bad address is an OSError naming them
    at once, not after minutes of loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebinding after a restart
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
