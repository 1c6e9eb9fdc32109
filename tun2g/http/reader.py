"""Reads HTTP/1.1 messages with streamed bodies from a socket-like object (thin driver over MessageParser)."""

from __future__ import annotations

import socket
import time
from typing import Callable

from .heads import HTTPError, RequestHead, ResponseHead
from .parser import CLOSED, DEFAULT_MAX_HEAD_SIZE, END, HeadEvent, MessageParser, Upgraded

RECV_SIZE = 65536


class MessageReader:
    """Reads requests (or responses) one after another from ``sock``, keeping what it over-read.

    Reuse one reader for every message of a keep-alive connection: pipelined bytes
    stay queued for the next message. Socket errors propagate as ``OSError``; a
    peer breaking HTTP raises ``HTTPError``.
    """

    def __init__(self, sock, *, max_head_size: int = DEFAULT_MAX_HEAD_SIZE) -> None:
        self.sock = sock
        self.max_head_size = max_head_size
        self.body_complete = True
        self.framing = 0           # of the current message: a length, CHUNKED or UNTIL_CLOSE
        self.keep_alive = False    # the current message's sender allows another message after it
        self.upgrade = False       # the current message asks for (request) or grants (101) an upgrade
        self.messages_read = 0     # heads read so far (> 0: the connection has been used before)
        # Decoded body bytes the current message may carry (None: any); past it read_body raises HTTPError(413).
        # Reset by each head, so a limit holds for one message only.
        self.body_limit: int | None = None
        self.body_read = 0
        self._parser: MessageParser | None = None
        self._events = None
        self._timing: tuple[float | None, float | None] | None = None  # (head, idle) for the head being read

    def _parser_for(self, is_request: bool) -> MessageParser:
        parser = self._parser
        if parser is None:
            parser = self._parser = MessageParser(is_request, self.max_head_size)
            self._events = parser.events
        elif parser.is_request != is_request:
            raise RuntimeError("a MessageReader reads either requests or responses, not both")
        return parser

    def _next_event(self):
        events, parser = self._events, self._parser
        while not events:
            if parser.finished:
                return parser.terminal_event
            parser.receive_data(self.sock.recv(RECV_SIZE))
        return events.popleft()

    def read_request_head(self, *, head_timeout: float | None = None,
                          idle_timeout: float | None = None) -> RequestHead | None:
        """The next request's head, or None if the peer closed cleanly before sending one.

        ``head_timeout``: the whole head must arrive within this many seconds (of
        the connection's first use, or of the first byte of a later head), however
        slowly it trickles in; else HTTPError(408). ``idle_timeout``: how long a
        used connection may wait for the next head's first byte; past it (or past
        ``head_timeout`` on a fresh connection with no byte at all) ``HeadTimeout``
        with ``started=False``: close quietly. The socket's timeout is left unset.
        """
        self._parser_for(True)
        if head_timeout is None and idle_timeout is None:
            return self._read_head()
        self._timing = (head_timeout, idle_timeout)
        try:
            return self._read_head()
        finally:
            self._timing = None
            self.sock.settimeout(None)

    def read_response_head(self, request_method: str) -> ResponseHead:
        """The next response's head (a 1xx is returned as is: call again for the final one)."""
        self._parser_for(False).request_method = request_method
        head = self._read_head()
        if head is None:
            raise HTTPError(502, "the connection closed before a response arrived")
        return head

    def expect_response(self, request_method: str) -> None:
        """Say which request the next response answers, before `feed` gives it bytes (HEAD has no body)."""
        self._parser_for(False).request_method = request_method

    def feed(self, data: bytes) -> None:
        """Parse bytes read elsewhere without waiting (b"": EOF); the next reads take them first.

        A reader whose `complete` is true then reads nothing from its socket for that message.
        One fed before any read or `expect_response` reads requests.
        """
        (self._parser or self._parser_for(True)).receive_data(data)

    @property
    def next_event(self):
        """The first event parsed and not yet read (a `HeadEvent`, bytes, END, CLOSED, an HTTPError), or None."""
        events = self._events
        return events[0] if events else None

    @property
    def complete(self) -> bool:
        """Whether a whole message, or an error or the end of the connection, is parsed and not yet read."""
        events = self._events
        if not events:
            return False
        last = events[-1]
        if last is END or type(events[0]) is not HeadEvent or type(last) not in (bytes, HeadEvent):
            return True  # the message's end; or an error, EOF or a protocol switch ends what is here
        return self.whole

    @property
    def whole(self) -> bool:
        """Whether a whole message is parsed and not yet read (its end is here, whatever follows it)."""
        events = self._events
        # Identity: `END in events` compares with == (a HeadEvent's dataclass __eq__).
        return bool(events) and (events[-1] is END or any(event is END for event in events))

    def read_final_response_head(self, request_method: str,
                                 on_interim: Callable[[ResponseHead], None] | None = None) -> ResponseHead:
        """The final response head (or a 101), passing each other 1xx head to ``on_interim`` (else skipping it)."""
        while True:
            head = self.read_response_head(request_method)
            if head.status >= 200 or head.status == 101:
                return head
            if on_interim is not None:
                on_interim(head)

    def _next_event_timed(self):
        """`_next_event` under the deadlines of `read_request_head` (one socket timeout per recv)."""
        events, parser, sock = self._events, self._parser, self.sock
        head_timeout, idle_timeout = self._timing  # type: ignore[misc]
        deadline = None  # for the whole head, once it has started
        if self.messages_read == 0 or idle_timeout is None:
            deadline = None if head_timeout is None else time.monotonic() + head_timeout
        started = False
        while not events:
            if parser.finished:
                return parser.terminal_event
            if deadline is None and not started:
                sock.settimeout(idle_timeout)
            elif deadline is None:
                sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HeadTimeout(started)
                sock.settimeout(remaining)
            try:
                data = sock.recv(RECV_SIZE)
            except socket.timeout:
                raise HeadTimeout(started) from None
            if not started and data:
                started = True
                if deadline is None and head_timeout is not None:
                    deadline = time.monotonic() + head_timeout
            parser.receive_data(data)
        return events.popleft()

    def _read_head(self):
        if not self.body_complete:
            raise RuntimeError("read the current message's body to its end before the next head")
        event = self._next_event() if self._timing is None else self._next_event_timed()
        if type(event) is not HeadEvent:
            if event is CLOSED:
                return None
            raise _unexpected(event)
        self.messages_read += 1
        self.body_limit = None
        self.body_read = 0
        self.framing = event.framing
        self.keep_alive = event.keep_alive
        self.upgrade = event.upgrade
        events = self._events
        if events and events[0] is END:
            events.popleft()
        else:
            self.body_complete = False
        return event.head

    def read_body(self, max_chunk: int = RECV_SIZE) -> bytes:
        """The next piece of the current message's decoded body; b"" once it is complete."""
        if self.body_complete:
            return b""
        event = self._next_event()
        if event is END:
            self.body_complete = True
            return b""
        if type(event) is not bytes:
            raise _unexpected(event)
        events = self._events
        if events and type(events[0]) is bytes and len(event) < max_chunk:
            pieces = [event]
            size = len(event)
            while events and type(events[0]) is bytes and size < max_chunk:
                piece = events.popleft()
                pieces.append(piece)
                size += len(piece)
            event = b"".join(pieces)
        if len(event) > max_chunk:
            events.appendleft(event[max_chunk:])
            event = event[:max_chunk]
        elif events and events[0] is END:
            events.popleft()
            self.body_complete = True
        if self.body_limit is not None:
            self.body_read += len(event)
            if self.body_read > self.body_limit:
                self.body_complete = True  # nothing more is read of it: the connection must close
                self.keep_alive = False
                raise HTTPError(413, f"the request body is larger than this site allows ({self.body_limit} bytes)")
        return event

    def take_ready_body(self) -> bytes:
        """The body bytes already received (maybe b""), without waiting; ``body_complete`` tells if that was all."""
        events = self._events
        if self.body_complete or not events or self.body_limit is not None:
            return b""  # under a limit the pieces go through read_body, which counts them
        pieces = []
        while events and type(events[0]) is bytes:
            pieces.append(events.popleft())
        if events and events[0] is END:
            events.popleft()
            self.body_complete = True
        return b"".join(pieces)

    def take_buffered(self) -> bytes:
        """Raw bytes received past the current message (after a protocol switch), for splicing."""
        events = self._events
        if events and type(events[0]) is Upgraded:
            return events.popleft().rest
        return b""

    @property
    def idle(self) -> bool:
        """Whether the current message is done and nothing more has arrived (safe to reuse the connection)."""
        return self.body_complete and not self._events and not (self._parser is not None and self._parser.finished)

    @property
    def switched_protocols(self) -> bool:
        """Whether the connection has left HTTP (a protocol switch was parsed)."""
        events = self._events
        return bool(events) and type(events[0]) is Upgraded


class HeadTimeout(HTTPError):
    """A request head did not arrive in time: a 408 if part of it came (``started``), else close quietly."""

    def __init__(self, started: bool) -> None:
        super().__init__(408, "the request head did not arrive in time" if started
                         else "no request arrived in time")
        self.started = started


def _unexpected(event) -> Exception:
    if isinstance(event, HTTPError):
        return event
    return HTTPError(400, f"unexpected {event!r} while reading HTTP (the connection switched protocols?)")
