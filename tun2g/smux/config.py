"""smux session settings, with the same defaults and validity rules as Go's smux.DefaultConfig/VerifyConfig."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .frame import MAX_PAYLOAD, SUPPORTED_VERSIONS

ACCEPT_BACKLOG = 1024  # Go smux's constant: SYNs queued for accept_stream before the reader waits
INITIAL_PEER_WINDOW = 262144  # Go smux v2: what a writer may send before the reader's first UPD
PRE_AUTH_RECEIVE_BUFFER = 64 * 1024  # a tun2 server's whole session budget before the Auth is verified


class ConfigError(ValueError):
    """A smux Config value is out of range; the message names the field and the rule."""


@dataclass
class Config:
    """Settings of one smux session (Go field names in snake_case; durations in seconds).

    ``version=None`` means negotiated (docs/protocol.md#version-negotiation): a client
    adopts the version of the first frame the peer sends and follows a later switch
    from 1 to 2; a server starts in version 1 and switches to 2 when its application
    calls ``Session.upgrade()``.
    ``max_stream_backlog`` caps one stream's unread bytes; a stream over it is reset
    so that it cannot stall the others. ``None`` picks max_receive_buffer // 4 in
    version 1 and, in version 2, twice the most a well-behaved peer may have in flight.
    ``backlog_seconds`` (version 1 only) raises that cap for a stream that is being
    read to this many seconds of its observed read rate: only a stream that fell
    further behind than that is cut (the session budget still pauses the reader).

    tun2g hardening (docs/protocol.md#memory-bounds): ``accept_peer_streams=False``
    answers every SYN from the peer with a FIN and buffers nothing for it (a tun2
    server never accepts streams); ``initial_receive_buffer`` is the session budget
    until ``Session.release_receive_buffer()`` (a server's budget before the Auth).
    """

    version: int | None = 1
    keepalive_disabled: bool = False
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    max_frame_size: int = 32768
    max_receive_buffer: int = 4 * 1024 * 1024
    max_stream_buffer: int = 65536
    max_stream_backlog: int | None = None
    backlog_seconds: float | None = None
    accept_peer_streams: bool = True
    initial_receive_buffer: int | None = None

    @classmethod
    def tun2_server(cls) -> Config:
        """A tun2 server: Go tun2's keepalive (1 s / 15 s), the version negotiated and 30 s
        of backlog for a slow v1 reader. (tun2g's Server adds accept_peer_streams=False and
        initial_receive_buffer=PRE_AUTH_RECEIVE_BUFFER to each tunnel session.)"""
        return cls(version=None, keepalive_interval=1.0, keepalive_timeout=15.0, backlog_seconds=30.0)

    def copy(self, **changes) -> Config:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise ConfigError unless Go's VerifyConfig would accept these settings."""
        if self.version is not None and self.version not in SUPPORTED_VERSIONS:
            raise ConfigError(f"smux version must be 1 or 2 (or None to adopt the peer's), not {self.version!r}")
        if not self.keepalive_disabled:
            if not self.keepalive_interval > 0:
                raise ConfigError(f"keepalive_interval must be positive, not {self.keepalive_interval!r}; "
                                  "set keepalive_disabled=True to turn keepalive off")
            if not self.keepalive_timeout >= self.keepalive_interval:
                raise ConfigError(f"keepalive_timeout ({self.keepalive_timeout}) must be at least "
                                  f"keepalive_interval ({self.keepalive_interval})")
        if not 1 <= self.max_frame_size <= MAX_PAYLOAD:
            raise ConfigError(f"max_frame_size must be between 1 and {MAX_PAYLOAD}, not {self.max_frame_size!r}")
        if not self.max_receive_buffer > 0:
            raise ConfigError(f"max_receive_buffer must be positive, not {self.max_receive_buffer!r}")
        if not 0 < self.max_stream_buffer <= 2**31 - 1:
            raise ConfigError(f"max_stream_buffer must be between 1 and 2147483647, not {self.max_stream_buffer!r}")
        if self.max_stream_buffer > self.max_receive_buffer:
            raise ConfigError(f"max_stream_buffer ({self.max_stream_buffer}) must not be larger than "
                              f"max_receive_buffer ({self.max_receive_buffer})")
        if self.max_stream_backlog is not None and not self.max_stream_backlog > 0:
            raise ConfigError(f"max_stream_backlog must be positive or None, not {self.max_stream_backlog!r}")
        if self.backlog_seconds is not None and not self.backlog_seconds > 0:
            raise ConfigError(f"backlog_seconds must be positive or None, not {self.backlog_seconds!r}")
        if self.initial_receive_buffer is not None and not 0 < self.initial_receive_buffer <= self.max_receive_buffer:
            raise ConfigError(f"initial_receive_buffer must be between 1 and max_receive_buffer "
                              f"({self.max_receive_buffer}), not {self.initial_receive_buffer!r}")

    def stream_backlog(self, version: int) -> int:
        """The unread bytes one stream may hold before it is reset (see the class docstring)."""
        if self.max_stream_backlog is not None:
            return self.max_stream_backlog
        if version == 1:
            # Never below one full frame, or a single PSH could trip it.
            return max(self.max_receive_buffer // 4, MAX_PAYLOAD)
        return 2 * max(INITIAL_PEER_WINDOW, self.max_stream_buffer)
