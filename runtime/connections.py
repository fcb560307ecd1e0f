"""Connection limits for `medc serve`, in uvicorn's protocol layer (below the app, where sockets are).

uvicorn has no deadline for a request's headers: a socket that connects and sends nothing, or half a request line,
stays open for good, and with `limit_concurrency` a crowd of such sockets turns every real request into a 503. The
guard here, a subclass of uvicorn's httptools protocol (`uvicorn.Config(http=guard(...))`), gives each connection
a header deadline (from connecting, and from the first byte of each later request on a kept-alive connection) and a
cap on header bytes, and keeps the open connections under a cap: at the cap, a new connection closes the one that
has been idle longest (no request in progress: headers never completed, or kept alive between requests) instead of
being refused, so idle and half-sent sockets, however many, can never lock out a request that arrives whole. Bodies
have their own deadline in the app (runtime/serve.py's read_body: 408), since only the app knows when it reads one.
uvicorn's `limit_concurrency` stays as a backstop above the cap, for when every connection has a request in progress.
What uvicorn answers on its own (that 503, a 400 for what is not HTTP) goes out as the app's prebuilt responses, in
its error shape, rather than uvicorn's plain text.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("medc.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers (nginx's default is 4 x 8 KiB)


class HeadTooLarge(Exception):
    """Raised in a parser callback: httptools reports it as a parser error, then send_400_response answers (431)
    and closes."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size cap, and a cap on open connections that
    evicts the longest-idle one. `guard()` makes the subclass with the limits filled in."""

    max_connections = 256
    header_timeout = 10.0
    # Starlette responses (ASGI apps) for what uvicorn answers itself: "overloaded" (503 past limit_concurrency),
    # "invalid" (not HTTP), "too_large" (headers over MAX_HEAD_BYTES). Missing: uvicorn's plain text.
    answers: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head = 0
        if "overloaded" in self.answers:  # checked in on_headers_complete instead of uvicorn's, same rule
            self.backstop, self.limit_concurrency = self.limit_concurrency, None

    # -- the connection's life --------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._head = 0
        idle, closing = self._idle_set(), self._closing_set()
        # At the cap: close connections that have no request in progress, longest idle first. When every one is
        # busy the newcomer still comes in; uvicorn's limit_concurrency, set above the cap, answers 503 beyond it.
        # (A closed connection leaves uvicorn's set only when its connection_lost runs: `closing` counts those.)
        while len(self.connections) - len(closing) > self.max_connections and idle:
            oldest = next(iter(idle))
            oldest._close("idle connection closed to admit a new one (--max-connections)")
        self._set_idle()
        self._arm(self.header_timeout)  # from connecting: headers must be complete by then

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._idle_set().pop(self, None)
        self._closing_set().discard(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        if self._deadline is None:  # a later request on a kept-alive connection: the deadline runs from its first byte
            self._arm(self.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._idle_set().pop(self, None)  # busy: a request is in progress (the app's task starts now)
        backstop = getattr(self, "backstop", None)
        if backstop is not None and (len(self.connections) >= backstop or len(self.tasks) >= backstop):
            log.warning("%d connections and %d requests open: answering 503 (limit_concurrency)",
                        len(self.connections), len(self.tasks))
            app, self.app = self.app, self.answers["overloaded"]
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request: then self.cycle is that one's
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._set_idle()  # kept alive: idle until the next request's headers (uvicorn's keep-alive timer runs)

    def send_400_response(self, msg: str) -> None:
        answer = self.answers.get("too_large" if self._head > MAX_HEAD_BYTES else "invalid")
        if answer is None:
            return super().send_400_response(msg)
        head = [STATUS_LINE[answer.status_code], *(n + b": " + v + b"\r\n" for n, v in answer.raw_headers), b"\r\n"]
        self.transport.write(b"".join(head) + answer.body)
        self.transport.close()

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _idle_set(self) -> OrderedDict:
        """This server's idle connections, longest idle first (kept on uvicorn's per-server state)."""
        idle = getattr(self.server_state, "medc_idle", None)
        if idle is None:
            idle = self.server_state.medc_idle = OrderedDict()
        return idle

    def _closing_set(self) -> set:
        """This server's connections closed here whose connection_lost has not run yet."""
        closing = getattr(self.server_state, "medc_closing", None)
        if closing is None:
            closing = self.server_state.medc_closing = set()
        return closing

    def _set_idle(self) -> None:
        idle = self._idle_set()
        idle.pop(self, None)
        idle[self] = None

    def _count(self, n: int) -> None:
        self._head += n
        if self._head > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._close,
                                              f"request headers not complete within {seconds:g} s (--header-timeout)")

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close(self, why: str) -> None:
        self._disarm()
        self._idle_set().pop(self, None)
        self._closing_set().add(self)  # until connection_lost
        if not self.transport.is_closing():
            log.debug("closing a connection: %s", why)
            self.transport.close()


def guard(max_connections: int, header_timeout: float, answers: dict | None = None) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as uvicorn.Config(http=...), with these limits and `answers` (see the class)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout, "answers": answers or {}})
