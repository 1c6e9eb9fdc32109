"""The HTTP-Upgrade tunnel on the public port: 101, then smux on the same connection.

The client's dial is in tests/client/test_upgrade.py, the wire forms in tests/transport/test_upgrade.py.
"""

from __future__ import annotations

import socket

from tun2g.transport import upgrade


def test_the_server_answers_101_and_starts_smux_on_the_same_connection(plain_deployment):
    with socket.create_connection(("127.0.0.1", plain_deployment.running.http_address[1]), timeout=5) as sock:
        sock.sendall(upgrade.encode_request("tunnel.example"))
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 8:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert upgrade.parse_response_head(head)[0] == 101
        assert rest[:2] == b"\x01\x00"  # smux v1 SYN: the server opens the control stream at once
