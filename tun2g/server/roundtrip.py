"""`Server.round_trip` for requests users: a transport adapter that sends requests through the tunnels.

`session.mount("http://", server.adapter())` makes `session.get("http://app.example/")`
reach the backend connected for app.example, as Go code would with
`http.Client{Transport: server}`. Each request goes through the server's
request pipeline, like a request from the public port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from requests.adapters import BaseAdapter
from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from tun2g.http import RequestHead

if TYPE_CHECKING:
    from tun2g.server.server import Server


class TunnelAdapter(BaseAdapter):
    """Sends each request with `server.round_trip`; bodies stream in both directions."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server

    def send(self, request: PreparedRequest, stream=False, timeout=None, verify=True, cert=None,
             proxies=None) -> Response:
        netloc = str(urlsplit(request.url).netloc)
        headers = [(name, value) for name, value in request.headers.items()]
        head = RequestHead(request.method or "GET", request.path_url, "HTTP/1.1", headers)
        if head.get("Host") is None:
            head.set("Host", netloc)
        body = request.body.encode() if isinstance(request.body, str) else request.body
        tunnel_response = self.server.round_trip(head, body)
        response = Response()
        response.status_code = tunnel_response.status
        response.reason = tunnel_response.reason or ""
        response.headers = CaseInsensitiveDict(tunnel_response.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = tunnel_response
        response.url = request.url or ""
        response.request = request
        response.connection = self  # type: ignore[assignment]  # requests' stubs say HTTPAdapter; any adapter works
        if not stream and tunnel_response.status != 101:
            _ = response.content  # read it all now, as requests does without stream=True
        return response

    def close(self) -> None:
        """Nothing pooled here: each request has its own stream."""
