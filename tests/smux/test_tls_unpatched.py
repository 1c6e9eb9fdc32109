"""smux over gevent's TLS sockets in a process that is NOT monkey-patched.

There gevent.ssl.SSLSocket is not an ssl.SSLSocket, and its sendmsg raises
NotImplementedError: the writer must still pick joined writes (or fall back to them).
The test suite itself runs patched, so this runs in a child process.
"""

import subprocess
import sys

from tests.fixtures.net import env_without_proxies

SCRIPT = r"""
import hashlib, os, sys
import gevent, gevent.socket, gevent.ssl
from gevent import monkey
from tun2g.smux import Config, Session

assert not monkey.is_module_patched("socket") and not monkey.is_module_patched("ssl")
ca_file, cert_file, key_file = sys.argv[1:4]
listener = gevent.socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
client_end = gevent.socket.create_connection(listener.getsockname())
server_end, _ = listener.accept()
server_context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
server_context.load_cert_chain(cert_file, key_file)
client_context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)  # create_default_context is stdlib's
client_context.load_verify_locations(ca_file)
handshake = gevent.spawn(server_context.wrap_socket, server_end, server_side=True)
client_tls = client_context.wrap_socket(client_end, server_hostname="localhost")
server_tls = handshake.get(timeout=5)
assert type(client_tls).__module__ == "gevent.ssl" and type(server_tls).__module__ == "gevent.ssl"
config = Config(keepalive_disabled=True, version=2)
client = Session(client_tls, client=True, config=config)
server = Session(server_tls, client=False, config=config)

def echo():
    while True:
        stream = server.accept_stream()
        gevent.spawn(lambda s=stream: [s.sendall(d) for d in iter(lambda: s.recv(65536), b"")] and None or s.close())

gevent.spawn(echo)
payloads = [os.urandom(n) for n in (1, 100, 40000, 1 << 20)]
for payload in payloads:
    stream = client.open_stream()
    writer = gevent.spawn(lambda s=stream, p=payload: (s.sendall(p), s.shutdown(1)))
    received = b""
    while chunk := stream.recv(65536):
        received += chunk
    writer.get(timeout=5)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(), len(payload)
    stream.close()
assert not client.is_closed and not server.is_closed, (client.close_reason, server.close_reason)
client.close()
server.close()
print("ok")
"""


def test_smux_runs_over_gevent_tls_without_monkey_patching(kcp_certs):
    result = subprocess.run([sys.executable, "-c", SCRIPT, kcp_certs.ca_file, kcp_certs.cert_file,
                             kcp_certs.key_file], capture_output=True, text=True, timeout=60,
                            env=env_without_proxies())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
