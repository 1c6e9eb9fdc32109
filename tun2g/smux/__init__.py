"""A byte-compatible Python implementation of xtaci/smux (protocol versions 1 and 2) for gevent.

``frame`` (wire format), ``config`` and ``state`` are pure code; ``session``,
``stream`` and ``writer`` drive them with gevent greenlets over any socket-like
transport.
"""

from .config import Config, ConfigError
from .errors import ProtocolError, SessionClosedError, StreamIdsExhaustedError, StreamResetError
from .session import Session
from .stream import Stream

__all__ = ["Config", "ConfigError", "ProtocolError", "Session", "SessionClosedError", "Stream",
           "StreamIdsExhaustedError", "StreamResetError"]
