"""The exceptions a smux session raises to its users."""

from __future__ import annotations

from .frame import ProtocolError

__all__ = ["ProtocolError", "SessionClosedError", "StreamIdsExhaustedError", "StreamResetError"]


class SessionClosedError(ConnectionError):
    """The smux session is gone (closed locally, by the peer, by keepalive or by a protocol error)."""


class StreamIdsExhaustedError(SessionClosedError):
    """Every stream id of this side has been used (smux's ErrGoAway); open a new session."""


class StreamResetError(ConnectionResetError):
    """This stream was reset locally because its reader fell too far behind."""
