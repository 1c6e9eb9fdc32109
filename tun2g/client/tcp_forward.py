"""The client's TCP side: streams that start with the tun2g preamble are spliced to a local TCP service.

`tun2g client --tcp 2222=127.0.0.1:22 --tls db.example.com=127.0.0.1:8443`
announces public port 2222 and the TLS name db.example.com in the Auth
(docs/tcp.md). For each stream the server opens with a preamble, the client
dials the local address for that port or name, answers one status byte (0:
connected, 1: refused, 2: unreachable; docs/protocol.md#tcp-streams) and
splices bytes both ways. Local addresses never leave the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tun2g.errors import ConfigurationError
from tun2g.log import get_logger
from tun2g.smux import SessionClosedError, Stream, StreamResetError
from tun2g.tcp.splice import Splice
from tun2g.tcp.wire import (HEADER_SIZE, KIND_TCP, STATUS_CONNECTED, STATUS_REFUSED, STATUS_UNREACHABLE,
                            Announcement, PreambleError, decode_preamble, preamble_length)
from tun2g.transport import tcp

log = get_logger(__name__)

PREAMBLE_TIMEOUT = 10.0


def parse_service(spec: str, *, flag: str) -> tuple[str, tuple[str, int]]:
    """``PUBLIC=HOST:PORT`` -> (PUBLIC, (host, port)); raises ConfigurationError naming `flag`."""
    public, sep, local = spec.partition("=")
    try:
        if not sep or not public:
            raise ValueError
        host, port = tcp.split_host_port(local)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        example = "2222=127.0.0.1:22" if flag == "--tcp" else "db.example.com=127.0.0.1:8443"
        raise ConfigurationError(f"{flag} {spec!r}: write PUBLIC=HOST:PORT, e.g. {flag} {example}") from None
    return public.strip().lower(), (host, port)


@dataclass
class TCPForwarder:
    """The local services behind this client's public TCP ports (0: any the server allocates) and TLS names."""

    ports: dict[int, tuple[str, int]] = field(default_factory=dict)
    names: dict[str, tuple[str, int]] = field(default_factory=dict)
    allocated: list[tuple[str, int]] = field(default_factory=list)  # locals of port-0 requests, in order
    assigned: dict[int, tuple[str, int]] = field(default_factory=dict)  # ports the server allocated -> locals
    connect_timeout: float = 10.0
    idle_timeout: float | None = 3600.0

    @classmethod
    def from_specs(cls, tcp_specs=(), tls_specs=(), **options) -> TCPForwarder:
        forwarder = cls(**options)
        for spec in tcp_specs:
            public, local = parse_service(spec, flag="--tcp")
            if not public.isdigit() or not 0 <= int(public) <= 65535:
                raise ConfigurationError(f"--tcp {spec!r}: the public side must be a port number (0: any)")
            if int(public) == 0:
                forwarder.allocated.append(local)
            elif int(public) in forwarder.ports:
                raise ConfigurationError(f"--tcp: port {public} is given twice")
            else:
                forwarder.ports[int(public)] = local
        for spec in tls_specs:
            name, local = parse_service(spec, flag="--tls")
            forwarder.names[name] = local
        return forwarder

    def __bool__(self) -> bool:
        return bool(self.ports or self.names or self.allocated)

    def announcement(self) -> Announcement:
        return Announcement(tuple(self.ports) + (0,) * len(self.allocated), tuple(self.names))

    def granted(self, reply_tcp: object) -> list[int]:
        """Learn the ports the server allocated (from its auth reply); returns every public port served."""
        ports = reply_tcp.get("ports", []) if isinstance(reply_tcp, dict) else []
        fresh = [p for p in ports if type(p) is int and p not in self.ports]
        self.assigned = dict(zip(fresh, self.allocated))
        return sorted([*self.ports, *self.assigned])

    def _local_for(self, kind: int, port: int, name: str) -> tuple[str, int] | None:
        if kind == KIND_TCP:
            return self.ports.get(port) or self.assigned.get(port)
        return self.names.get(name.lower())

    def serve(self, stream: Stream) -> None:
        """Serve one preamble stream (the caller saw its first byte): dial, answer, splice."""
        stream.peer_fin_ends_writes = False  # a TCP stream half-closes: the server's FIN ends one direction
        try:
            stream.settimeout(PREAMBLE_TIMEOUT)
            header = _recv_exactly(stream, HEADER_SIZE)
            preamble = decode_preamble(header + _recv_exactly(stream, preamble_length(header) - HEADER_SIZE))
        except (PreambleError, OSError, SessionClosedError, StreamResetError) as exc:
            log.warning("tcp_preamble_refused", stream=stream.id, error=str(exc) or type(exc).__name__)
            stream.close()
            return
        target = self._local_for(preamble.kind, preamble.port, preamble.name)
        service = preamble.port if preamble.kind == KIND_TCP else preamble.name
        if target is None:
            log.warning("tcp_unknown_service", service=service, remote=preamble.remote)
            _answer_and_close(stream, STATUS_UNREACHABLE)
            return
        try:
            local = tcp.dial(f"{target[0]}:{target[1]}", timeout=self.connect_timeout)
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            log.warning("tcp_local_refused" if refused else "tcp_local_unreachable", service=service,
                        local=f"{target[0]}:{target[1]}", remote=preamble.remote, error=str(exc))
            _answer_and_close(stream, STATUS_REFUSED if refused else STATUS_UNREACHABLE)
            return
        try:
            stream.settimeout(None)
            stream.sendall(bytes((STATUS_CONNECTED,)))
        except (OSError, SessionClosedError, StreamResetError):
            local.close()
            stream.close()
            return
        end = Splice(local, stream, idle_timeout=self.idle_timeout).run()
        log.debug("tcp_connection", service=service, remote=preamble.remote, end=end)


def _recv_exactly(stream: Stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = stream.recv(size - len(data))
        if not piece:
            raise PreambleError("the stream ended inside its preamble")
        data += piece
    return data


def _answer_and_close(stream: Stream, status: int) -> None:
    try:
        stream.sendall(bytes((status,)))
    except (OSError, SessionClosedError, StreamResetError):
        pass
    stream.close()


__all__ = ["TCPForwarder", "parse_service"]
