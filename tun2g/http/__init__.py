"""HTTP/1.1 on socket-like objects: heads, streamed bodies, one proxied exchange, a backend pool.

The parsing and encoding are sans-I/O (``heads``, ``parser``, ``encode``); the
gevent drivers (``reader``, ``relay``, ``pool``) only move bytes. A proxy loop::

    reader = MessageReader(public_sock)
    while (head := reader.read_request_head()) is not None:   # HTTPError -> answer exc.status
        ...rewrite head...
        try:
            result = forward_exchange(head, reader, upstream, public_sock,
                                      upstream_reader=upstream_reader)
        except UpstreamError:      # nothing final went to the client yet
            public_sock.sendall(simple_response(502, b"bad gateway\\n", close=True)); break
        except DownstreamError:    # the client went away: drop the upstream
            break
        if not result.keep_alive:
            break
"""

from .encode import (LAST_CHUNK, encode_chunk, encode_request_head, encode_response_head, simple_response,
                     write_request_head, write_response_head)
from .heads import HOP_BY_HOP, HTTPError, RequestHead, ResponseHead, forwardable_headers, strip_hop_by_hop
from .parser import CHUNKED, UNTIL_CLOSE, MessageParser
from .pool import BackendPool
from .reader import MessageReader
from .relay import (SMALL_BODY, DownstreamError, ExchangeResult, ExchangeTimeouts, Later, UpstreamError,
                    UpstreamTimeout, downstream_response_head, fed_response_ready, forward_exchange, send_all,
                    serve_requests, take_small_response, upstream_request_head)

__all__ = [
    "serve_requests",
    "BackendPool", "CHUNKED", "DownstreamError", "ExchangeResult", "ExchangeTimeouts", "HOP_BY_HOP", "HTTPError",
    "LAST_CHUNK", "Later", "SMALL_BODY",
    "MessageParser", "MessageReader", "RequestHead", "ResponseHead", "UNTIL_CLOSE", "UpstreamError", "UpstreamTimeout",
    "downstream_response_head", "encode_chunk", "encode_request_head", "encode_response_head", "fed_response_ready",
    "forward_exchange",
    "forwardable_headers", "send_all", "simple_response", "strip_hop_by_hop", "take_small_response",
    "upstream_request_head",
    "write_request_head", "write_response_head",
]
