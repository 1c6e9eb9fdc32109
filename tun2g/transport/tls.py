"""TLS for tunnel connections over TCP: contexts, cooperative handshakes, dev certificates.

The sockets are gevent's, so every handshake and read yields to the hub; a
client that stalls mid-handshake costs one greenlet and its deadline, never
the process. Certificates are made with `cryptography` (pyOpenSSL's own
X.509 builders are deprecated in its favour).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from gevent import ssl as gssl

from tun2g.errors import ConfigurationError

HANDSHAKE_TIMEOUT = 10.0
DEV_CERT_NAME, DEV_KEY_NAME = "tun2g-dev-cert.pem", "tun2g-dev-key.pem"


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for the tunnel port; fails early with a clear message."""
    context = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}") from None
    return context


def client_context(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context that verifies the server (system roots, or `ca_file`) unless insecure."""
    context = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        try:
            context.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"--ca {ca_file}: not a PEM certificate ({getattr(exc, 'reason', None) or exc}); "
                                     f"give the server's certificate file (e.g. tun2g-dev-cert.pem)") from None
    else:
        context.load_default_certs()
    return context


def accept_tls(sock, context: ssl.SSLContext, timeout: float = HANDSHAKE_TIMEOUT):
    """Run the server side of a handshake on an accepted socket within `timeout`."""
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    tls.settimeout(timeout)
    tls.do_handshake()
    tls.settimeout(None)
    return tls


def connect_tls(sock, context: ssl.SSLContext, server_hostname: str, timeout: float = HANDSHAKE_TIMEOUT):
    """Run the client side of a handshake on a connected socket within `timeout`."""
    tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    tls.settimeout(timeout)
    tls.do_handshake()
    tls.settimeout(None)
    return tls


def make_dev_certificate(directory: Path, hostnames=("localhost", "127.0.0.1", "::1"),
                         days: int = 825) -> tuple[Path, Path]:
    """Write a self-signed certificate and key for development; return their paths.

    Clients trust it with `--ca <cert>`. Existing files are kept, so restarting a
    development server does not invalidate clients that already trust it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    cert_path, key_path = directory / DEV_CERT_NAME, directory / DEV_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tun2g development ({hostnames[0]})")])
    sans = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
