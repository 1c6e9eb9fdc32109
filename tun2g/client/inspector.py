"""The request inspector: a tee of each exchange the client proxies, a local web UI, and Replay.

The hot path only copies what streams by into capped buffers (`Capture`, the
relay's meter for the exchange) and puts the finished capture in a ring of the
recent ones (`Inspector.finish`: no wait, no greenlet woken). A capture is
digested (redacted, its bodies rendered) into a `Record` only when something
reads it: the API, or an open page, to which one greenlet pushes summaries over
Server-Sent Events from a bounded backlog (a full backlog skips the push, and
counts it; the exchange is still listed). Nobody looking costs no digesting.

What the UI sees is redacted (Authorization, Cookie, Set-Cookie,
Proxy-Authorization, X-Tun2g-*, and the tunnel token wherever it appears);
Replay re-sends the original headers, which stay in this process only.

The web side answers only Host headers naming the loopback address it listens
on (DNS rebinding) and a replay only as an `application/json` POST (a form
cannot send one cross-site without a CORS preflight we never grant).
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, cast
from urllib.parse import parse_qs

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from gevent.queue import Empty, Full, Queue

from tun2g.http import RequestHead, ResponseHead
from tun2g.http.heads import REDACTED, is_secret_header
from tun2g.http.client import send_request
from tun2g.log import get_logger

if TYPE_CHECKING:
    from tun2g.client.telemetry import ClientMetrics
    from tun2g.http import BackendPool

log = get_logger(__name__)

BODY_CAP = 64 * 1024           # body bytes kept per direction and exchange
RING_SIZE = 200                # recent exchanges kept
LIVE_BACKLOG = 256             # finished captures waiting to be pushed to the open pages
SUBSCRIBER_QUEUE = 64          # summaries waiting for one slow page; more are dropped for it
MAX_SUBSCRIBERS = 16
MAX_CONNECTIONS = 64           # connections the UI serves at once (live pages included)
KEEPALIVE_SECONDS = 15.0
REPLAY_TIMEOUT = 30.0
MAX_REPLAY_REQUEST = 2 * BODY_CAP  # the JSON of an edited request
HEX_PREVIEW = 2048
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class Capture:
    """What one exchange looked like, teed as it streamed by (each body at most ``cap`` bytes).

    It is the relay's meter (`tun2g.http.relay.Meter`): ``up``/``down`` hear the unframed
    body bytes of each write, so nothing is parsed again and nothing beyond the cap is held.
    """

    __slots__ = ("method", "target", "version", "request_headers", "started", "cap", "request_body",
                 "request_size", "response_head", "response_size", "status", "duration",
                 "error", "replay_of", "upgrade", "finished_at", "response_body", "response_complete", "id")

    def __init__(self, head: RequestHead, cap: int = BODY_CAP, replay_of: int | None = None) -> None:
        self.method = head.method
        self.target = head.target
        self.version = head.version
        self.request_headers = list(head.headers)
        self.started = time.monotonic()
        self.finished_at = 0.0
        self.cap = cap
        self.request_body = bytearray()
        self.request_size = 0
        self.response_head: ResponseHead | None = None
        self.response_body = bytearray()
        self.response_size = 0             # body bytes of the final response
        self.response_complete = False     # the final response's body went by whole
        self.status = 0
        self.duration = 0.0
        self.error: str | None = None
        self.replay_of = replay_of
        self.upgrade = False
        self.id = 0  # its record's, given when it finishes

    def add_request_body(self, data: bytes) -> None:
        self.request_size += len(data)
        room = self.cap - len(self.request_body)
        if room > 0 and data:
            self.request_body += data[:room]

    def up(self, size: int, body: bytes) -> None:
        if body:
            self.add_request_body(body)

    def down(self, size: int, body: bytes) -> None:
        if body and self.response_head is not None:  # (bytes before the final head are interim heads)
            self.response_size += len(body)
            room = self.cap - len(self.response_body)
            if room > 0:
                self.response_body += body[:room]

    def response_filter(self, head: ResponseHead) -> None:
        """For ``forward_exchange``: the final head is about to go downstream."""
        self.response_head = ResponseHead(head.status, head.reason, head.version, list(head.headers))


@dataclass
class Record:
    """A digested exchange: ``public`` is what the UI may see; the originals stay here for Replay."""

    id: int
    public: dict
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    body_complete: bool
    summary: dict = field(default_factory=dict)


class Inspector:
    """Captures exchanges (bounded), keeps the recent ones, serves the page, the API and /metrics."""

    def __init__(self, pool: BackendPool | None = None, *, secrets: Iterable[str] = (), metrics: ClientMetrics | None = None,
                 body_cap: int = BODY_CAP, ring_size: int = RING_SIZE, live_backlog: int = LIVE_BACKLOG,
                 status: Callable[[], dict] | None = None, replay_timeout: float = REPLAY_TIMEOUT) -> None:
        self.pool = pool
        self.replay_timeout = replay_timeout
        self.metrics = metrics
        self.body_cap = body_cap
        self.secrets = [s for s in secrets if s]
        self.dropped = 0
        self.captured = 0
        self._status = status or (lambda: {})
        self._live: deque[Capture] = deque()  # finished while a page is open, not yet pushed to it
        self.live_backlog = live_backlog
        self._live_waiting = Event()
        # The recent exchanges, oldest first: a Capture until something reads it, then its Record.
        self._records: deque[Capture | Record] = deque(maxlen=ring_size)
        self._ids = itertools.count(1)
        self._subscribers: list[Queue] = []
        self._pusher: gevent.Greenlet | None = None
        self._server: WSGIServer | None = None
        self.address: tuple[str, int] | None = None
        self._allowed_hosts: frozenset[str] = frozenset()

    def use_backend(self, pool: BackendPool) -> None:
        """Where Replay sends requests (the Client passes its pool)."""
        self.pool = pool

    def set_status(self, status: Callable[[], dict]) -> None:
        """What /api/status reports about the tunnel."""
        self._status = status

    # --- the hot path ------------------------------------------------------------------

    def begin(self, head: RequestHead) -> Capture:
        """A capture of the exchange ``head`` starts: the meter to forward it with."""
        capture = Capture(head, self.body_cap)
        # A protocol switch: the exchange is recorded, not the spliced bytes (they carry no body).
        capture.upgrade = "upgrade" in head.connection_tokens() and head.get("Upgrade") is not None
        return capture

    def finish(self, capture: Capture, status: int, error: str | None = None) -> None:
        """Keep a finished capture among the recent ones; never blocks, digests nothing."""
        capture.status = status
        capture.error = error
        capture.finished_at = time.time()
        capture.duration = time.monotonic() - capture.started
        capture.id = next(self._ids)
        self._records.append(capture)
        self.captured += 1
        if self._subscribers:
            if len(self._live) < self.live_backlog:
                self._live.append(capture)
                self._live_waiting.set()
            else:  # the pages read too slowly: they find it in the list instead
                self.dropped += 1
                if self.metrics is not None:
                    self.metrics.captures_dropped.inc()

    # --- digesting -----------------------------------------------------------------

    def start_pushing(self) -> None:
        """Start the greenlet that pushes finished exchanges to the open pages."""
        if self._pusher is None:
            self._pusher = gevent.spawn(self._push_loop)

    def _push_loop(self) -> None:
        while True:
            self._live_waiting.wait()
            self._live_waiting.clear()
            while self._live:
                record = self._record_of(self._live.popleft())
                if record is not None:
                    self._push(record)

    def _push(self, record: Record) -> None:
        message = ("event: request\ndata: " + json.dumps(record.summary) + "\n\n").encode()
        for subscriber in list(self._subscribers):
            try:
                subscriber.put_nowait(message)
            except Full:
                pass  # that page reads too slowly; it still finds the record in the list

    def _record_of(self, entry: Capture | Record) -> Record | None:
        """The Record of a recent exchange, digested now if it was not yet (and kept digested in the ring);
        None for a capture that cannot be rendered (logged, and left out of the ring)."""
        if isinstance(entry, Record):
            return entry
        try:
            record: Record | None = self._digest(entry)
        except Exception as exc:  # one capture we cannot render must not break the page or the API
            log.warning("inspector_digest_failed", error=repr(exc))
            record = None
        records = self._records
        for index in range(len(records) - 1, -1, -1):  # most reads are of the newest
            if records[index] is entry:
                if record is None:
                    del records[index]
                else:
                    records[index] = record
                break
        return record

    def _add(self, capture: Capture) -> Record:
        """Record a capture at once (a replay, whose answer is the record)."""
        capture.id = next(self._ids)
        record = self._digest(capture)
        self._records.append(record)
        self.captured += 1
        if self._subscribers:
            self._push(record)
        return record

    def _digest(self, capture: Capture) -> Record:
        record_id = capture.id
        response_headers: list[tuple[str, str]] = []
        response_body = b""
        response_complete = True
        reason = ""
        response_size = 0
        if capture.response_head is not None:
            response_headers = capture.response_head.headers
            reason = capture.response_head.reason
            response_body, response_size, response_complete = _decode_response(capture)
        request_complete = capture.request_size <= len(capture.request_body)
        summary = {
            "id": record_id, "method": capture.method, "path": self._scrub(capture.target),
            "status": capture.status, "duration_ms": round(capture.duration * 1000, 1),
            "request_size": capture.request_size, "response_size": response_size,
            "time": capture.finished_at, "replay_of": capture.replay_of, "error": self._scrub(capture.error),
        }
        public = dict(summary)
        public.update({
            "version": capture.version, "reason": reason, "upgrade": capture.upgrade,
            "request_headers": self._redact(capture.request_headers),
            "response_headers": self._redact(response_headers),
            "request_body": self._render(bytes(capture.request_body), capture.request_size, request_complete,
                                         _content_type(capture.request_headers)),
            "response_body": self._render(response_body, max(response_size, len(response_body)),
                                          response_complete, _content_type(response_headers)),
            "replayable": request_complete and not capture.upgrade,
        })
        return Record(record_id, public, capture.method, capture.target, capture.version,
                      capture.request_headers, bytes(capture.request_body), request_complete, summary)

    def _scrub(self, text: str | None) -> str | None:
        if text is None:
            return None
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _redact(self, headers: list[tuple[str, str]]) -> list[list[str]]:
        return [[name, REDACTED if is_secret_header(name) else cast(str, self._scrub(value))]
                for name, value in headers]

    def _render(self, body: bytes, size: int, complete: bool, content_type: str) -> dict:
        rendered: dict[str, Any] = {"size": size, "captured": len(body), "truncated": not complete}
        if not body:
            rendered.update(kind="empty", text="")
            return rendered
        text = _as_text(body, complete)
        if text is None:
            preview = body[:HEX_PREVIEW]
            rendered.update(kind="binary", text=_hexdump(preview), hex_bytes=len(preview))
            return rendered
        if complete and ("json" in content_type or text.lstrip()[:1] in ("{", "[")):
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                rendered.update(kind="json", text=self._scrub(text))
                return rendered
            except ValueError:
                pass
        rendered.update(kind="text", text=self._scrub(text))
        return rendered

    # --- reading -------------------------------------------------------------------

    def records(self, path: str = "", status: str = "") -> list[dict]:
        """Summaries, newest first, whose path contains ``path`` and whose status starts with ``status``."""
        found = []
        for entry in reversed(list(self._records)):  # (a copy: digesting replaces entries in place)
            record = self._record_of(entry)
            if record is None:
                continue
            summary = record.summary
            if path and path not in (summary["path"] or ""):
                continue
            if status and not str(summary["status"]).startswith(status.rstrip("x")):
                continue
            found.append(summary)
        return found

    def record(self, record_id: int) -> Record | None:
        for entry in self._records:
            if entry.id == record_id:
                return self._record_of(entry)
        return None

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """For embedders and tests: whether ``predicate`` became true within ``timeout`` (polled per capture)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            gevent.sleep(min(left, 0.01))
        return True

    # --- replay --------------------------------------------------------------------

    def replay(self, record: Record, edits: dict) -> Record:
        """Send ``record``'s request again to the backend (``edits``: method, path, headers, body); record it."""
        if self.pool is None:
            raise ReplayError(503, "no backend to replay to yet")
        method = str(edits.get("method") or record.method).upper()
        target = str(edits.get("path") or record.target)
        if not target.startswith("/") or any(c in target for c in " \r\n") or not method.isalpha():
            raise ReplayError(400, "the method must be a word and the path start with / and hold no spaces")
        headers = record.headers
        if edits.get("headers") is not None:
            headers = _edited_headers(record.headers, edits["headers"])
        if edits.get("body") is not None:
            body = str(edits["body"]).encode()
        elif record.body_complete:
            body = record.body
        else:
            raise ReplayError(409, f"the original body was larger than the {self.body_cap}-byte capture cap; "
                                   f"send an edited body instead")
        head = RequestHead(method, self.pool.join_path(target), "HTTP/1.1",
                           [h for h in headers if h[0].lower() not in ("content-length", "transfer-encoding")])
        capture = Capture(RequestHead(method, target, "HTTP/1.1", list(head.headers)), self.body_cap,
                          replay_of=record.id)
        capture.add_request_body(body)
        status, error = 0, None
        try:
            status = self._send_replay(head, body, capture)
        except (OSError, ValueError) as exc:
            error = f"backend: {exc or type(exc).__name__}"
        except Exception as exc:
            error = f"backend: {exc}"
        capture.status = status
        capture.error = error
        capture.finished_at = time.time()
        capture.duration = time.monotonic() - capture.started
        return self._add(capture)

    def _send_replay(self, head: RequestHead, body: bytes, capture: Capture) -> int:
        assert self.pool is not None
        sock, reader = self.pool.dial()
        # One deadline for the whole replay: a backend dripping a byte per read timeout must not hold it.
        deadline = gevent.Timeout(self.replay_timeout, OSError(f"no whole answer within {self.replay_timeout:g} s"))
        deadline.start()
        try:
            sock.settimeout(self.replay_timeout)
            send_request(sock, head, body, close=True)
            response = reader.read_final_response_head(head.method)
            capture.response_filter(response)
            received = capture.response_body
            while len(received) < self.body_cap:
                piece = reader.read_body()
                if not piece:
                    break
                received += piece
            capture.response_complete = reader.body_complete and len(received) <= self.body_cap
            capture.response_size = max(len(received), response.content_length or 0)
            del received[self.body_cap:]
            return response.status
        finally:
            deadline.close()
            sock.close()

    # --- the web side ----------------------------------------------------------------

    def listen(self, host: str, port: int, *, next_free: int = 0) -> tuple[str, int]:
        """Bind the UI to ``host:port`` (trying the ``next_free`` following ports when taken); start serving.

        Raises OSError when none can be bound.
        """
        last_error: OSError | None = None
        for candidate in range(port, port + next_free + 1):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((host, candidate))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            bound = sock.getsockname()
            self.address = (host, bound[1])
            shown = f"[{host}]" if ":" in host else host
            hosts = {f"{shown}:{bound[1]}"}
            if _is_loopback(host):
                hosts |= {f"{name}:{bound[1]}" for name in LOOPBACK_NAMES}
            self._allowed_hosts = frozenset(hosts)
            # A bounded pool: a local page (or anything else on this machine) opening connections in a
            # loop gets them queued in the backlog, not a greenlet each.
            self._server = WSGIServer(sock, self._app, log=None, error_log=None, spawn=MAX_CONNECTIONS)
            self._server.start()
            self.start_pushing()
            return self.address
        raise last_error or OSError("no port to bind")

    @property
    def url(self) -> str:
        if self.address is None:
            return ""
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None
        if self._pusher is not None:
            self._pusher.kill(block=False)
            self._pusher = None
        for subscriber in list(self._subscribers):
            try:
                subscriber.put_nowait(None)
            except Full:
                pass

    def _app(self, environ: dict, start_response) -> Iterable[bytes]:
        host = (environ.get("HTTP_HOST") or "").lower()
        if host not in self._allowed_hosts:
            return _reply(start_response, 403, {"error": "this Host is not the inspector's address "
                                                         "(DNS rebinding protection)"})
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        if method == "GET":
            if path in ("/", "/index.html"):
                return _static(start_response, "index.html", "text/html; charset=utf-8")
            if path == "/inspector.js":
                return _static(start_response, "inspector.js", "text/javascript; charset=utf-8")
            if path == "/metrics":
                from tun2g.client.telemetry import CONTENT_TYPE_LATEST

                data = self.metrics.render() if self.metrics is not None else b""
                start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
                return [data]
            if path == "/api/requests":
                query = parse_qs(environ.get("QUERY_STRING", ""))
                return _reply(start_response, 200, {
                    "requests": self.records(query.get("path", [""])[0], query.get("status", [""])[0]),
                    "dropped": self.dropped, "captured": self.captured})
            if path == "/api/status":
                return _reply(start_response, 200, dict(self._status(), dropped=self.dropped,
                                                        captured=self.captured))
            if path == "/api/events":
                return self._events(start_response)
            if path.startswith("/api/requests/") and path[len("/api/requests/"):].isdigit():
                record = self._record_at(path)
                if record is None:
                    return _reply(start_response, 404, {"error": "no such request (the ring keeps the recent ones)"})
                return _reply(start_response, 200, record.public)
        if method == "POST" and path.startswith("/api/requests/") and path.endswith("/replay"):
            return self._replay_view(environ, start_response, path)
        if method not in ("GET", "POST"):
            return _reply(start_response, 405, {"error": "GET or POST only"})
        return _reply(start_response, 404, {"error": "not found"})

    def _record_at(self, path: str) -> Record | None:
        part = path[len("/api/requests/"):].split("/", 1)[0]
        return self.record(int(part)) if part.isdigit() else None

    def _replay_view(self, environ: dict, start_response, path: str) -> Iterable[bytes]:
        content_type = (environ.get("CONTENT_TYPE") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return _reply(start_response, 415, {"error": "a replay must be POSTed as application/json"})
        record = self._record_at(path)
        if record is None:
            return _reply(start_response, 404, {"error": "no such request"})
        length = environ.get("CONTENT_LENGTH") or "0"
        if not length.isdigit() or int(length) > MAX_REPLAY_REQUEST:
            return _reply(start_response, 413, {"error": f"send at most {MAX_REPLAY_REQUEST} bytes of JSON"})
        raw = environ["wsgi.input"].read(int(length)) if int(length) else b"{}"
        try:
            edits = json.loads(raw or b"{}")
            if not isinstance(edits, dict):
                raise ValueError("not an object")
        except ValueError:
            return _reply(start_response, 400, {"error": "the body must be a JSON object"})
        try:
            replayed = self.replay(record, edits)
        except ReplayError as exc:
            return _reply(start_response, exc.status, {"error": exc.message})
        return _reply(start_response, 200, replayed.public)

    def _events(self, start_response) -> Iterable[bytes]:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            return _reply(start_response, 503, {"error": f"at most {MAX_SUBSCRIBERS} live pages"})
        subscriber: Queue = Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.append(subscriber)
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                                  ("X-Accel-Buffering", "no")])
        return self._stream_events(subscriber)

    def _stream_events(self, subscriber: Queue) -> Iterator[bytes]:
        try:
            yield b"retry: 1000\nevent: hello\ndata: {}\n\n"
            while True:
                try:
                    message = subscriber.get(timeout=KEEPALIVE_SECONDS)
                except Empty:
                    message = b": keepalive\n\n"
                if message is None:
                    return
                yield message
        finally:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)


class ReplayError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_STATUS_TEXT = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
                503: "Service Unavailable"}


def _reply(start_response, status: int, obj: dict) -> list[bytes]:
    data = json.dumps(obj).encode()
    start_response(f"{status} {_STATUS_TEXT.get(status, 'Error')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                    ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    return [data]


_STATIC_CACHE: dict[str, bytes] = {}


def _static(start_response, name: str, content_type: str) -> list[bytes]:
    data = _STATIC_CACHE.get(name)
    if data is None:
        data = _STATIC_CACHE[name] = resources.files("tun2g.client").joinpath("static", name).read_bytes()
    start_response("200 OK", [
        ("Content-Type", content_type), ("Content-Length", str(len(data))), ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
        ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                                    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")])
    return [data]


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _content_type(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "content-type":
            return value.lower()
    return ""


def _as_text(body: bytes, complete: bool) -> str | None:
    """The body as text, or None when it looks binary (invalid UTF-8, or control characters)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        if complete or exc.start < len(body) - 3:
            return None
        text = body[:exc.start].decode("utf-8")  # a character cut by the cap
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return None
    return text


def _hexdump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset:offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{offset:08x}  {row.hex(' '):<47}  {text}")
    return "\n".join(lines)


def _decode_response(capture: Capture) -> tuple[bytes, int, bool]:
    """(the response body kept, its size, whether the body is all there)."""
    body = bytes(capture.response_body[:capture.cap])
    return body, capture.response_size, capture.response_complete and capture.response_size <= len(body)


def _edited_headers(original: list[tuple[str, str]], edited: Any) -> list[tuple[str, str]]:
    """The edited header list; a value left as "[redacted]" keeps the original value of that header."""
    if not isinstance(edited, list):
        raise ReplayError(400, "headers must be a list of [name, value] pairs")
    originals: dict[str, list[str]] = {}
    for name, value in original:
        originals.setdefault(name.lower(), []).append(value)
    result = []
    for pair in edited:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ReplayError(400, "headers must be a list of [name, value] pairs")
        name, value = pair
        if not name or any(c in name + value for c in "\r\n") or ":" in name:
            raise ReplayError(400, f"invalid header {name!r}")
        if value == REDACTED and originals.get(name.lower()):
            value = originals[name.lower()].pop(0)
        result.append((name, value))
    return result
