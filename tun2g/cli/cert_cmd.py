"""`tun2g cert`: public HTTPS certificates in the store, and the development certificate.

`tun2g cert add DOMAIN --cert F --key F` stores a certificate (checked: it parses,
the key matches, the name is among its names) where every server node finds it
within a second; `tun2g cert list` shows them (never a key). `tun2g cert dev`
makes the self-signed development certificate for the tunnel port; the older
`tun2g cert [--out DIR] [--host H]` form does the same.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol, cast

import click

from tun2g.cli.options import acme_challenge_option, acme_options, print_table
from tun2g.cli.store_cmd import CONTEXT, _json_flag, _opened, _storage_option, _when
from tun2g.storage import Storage
from tun2g.storage.certificates import CertificateStore

_dev_out = click.option("--out", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
                        help="Where to write tun2g-dev-cert.pem and tun2g-dev-key.pem.")
_dev_hosts = click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1", "::1"),
                          show_default=True, help="Names and addresses the certificate is valid for (repeat).")


def _make_dev_certificate(directory: str, hosts: tuple[str, ...]) -> None:
    from tun2g.transport.tls import make_dev_certificate

    cert_path, key_path = make_dev_certificate(Path(directory), hostnames=tuple(hosts))
    click.echo(f"certificate: {cert_path}\nkey:         {key_path}")


class _CertificateStorage(CertificateStore, Storage, Protocol):
    """A store that keeps certificates (both of ours do)."""


@contextmanager
def _certificates(storage_url: str | None) -> Iterator[_CertificateStorage]:
    with _opened(storage_url) as storage:
        if not isinstance(storage, CertificateStore):
            raise click.ClickException(f"{storage.describe()} does not keep certificates")
        yield cast(_CertificateStorage, storage)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@_dev_out
@_dev_hosts
@click.pass_context
def cert(ctx, directory, hosts):
    """Public HTTPS certificates (add, list, rm) and the development certificate (dev).

    \b
    Examples:
      tun2g cert add app.example.com --cert fullchain.pem --key privkey.pem
      tun2g cert add '*.example.com' --cert wildcard.pem --key wildcard-key.pem
      tun2g cert list [--json]
      tun2g cert dev --out ~/.local/share/tun2g     # same as the older `tun2g cert --out DIR`
    """
    if ctx.invoked_subcommand is None:
        _make_dev_certificate(directory, hosts)


@cert.command("dev")
@_dev_out
@_dev_hosts
def dev(directory, hosts):
    """Make a self-signed development certificate for the tunnel port.

    Start the server with --tls-cert/--tls-key and give clients --ca with the certificate.
    """
    _make_dev_certificate(directory, hosts)


@cert.command("add")
@click.argument("name")
@click.option("--cert", "cert_file", required=True, type=click.File("r"),
              help="The PEM certificate chain (the certificate first, then intermediates).")
@click.option("--key", "key_file", required=True, type=click.File("r"), help="The PEM private key (unencrypted).")
@_storage_option
def add(name, cert_file, key_file, storage_url):
    """Store a certificate for NAME (a domain or *.domain); the servers serve it by SNI within a second."""
    from tun2g.storage.certificates import InvalidCertificate, certificate_info

    try:
        certificate = certificate_info(name, cert_file.read(), key_file.read(), "static", time.time())
    except InvalidCertificate as exc:
        raise click.BadParameter(str(exc), param_hint="--cert/--key") from None
    with _certificates(storage_url) as store:
        store.put_certificate(certificate)
    info = certificate.info
    click.echo(f"stored certificate for {info.name} (issuer {info.issuer}, expires {_when(info.not_after)})")


@cert.command("list")
@_json_flag
@_storage_option
def list_(as_json, storage_url):
    """Stored certificates: name, issuer, expiry, who stored it (keys are never shown)."""
    with _certificates(storage_url) as store:
        records = store.list_certificates()
        where = store.describe()
    if as_json:
        click.echo(json.dumps([record.as_json() for record in records], indent=2))
    elif not records:
        click.echo(f"no certificates in {where} (add one with `tun2g cert add DOMAIN --cert F --key F`)")
    else:
        print_table(("NAME", "ISSUER", "EXPIRES", "SOURCE"),
                    [(r.name, r.issuer, _when(r.not_after), r.source) for r in records])


@cert.command("rm")
@click.argument("name")
@_storage_option
def rm(name, storage_url):
    """Delete NAME's certificate; the servers stop serving it within a second."""
    from tun2g.storage.certificates import InvalidCertificate

    with _certificates(storage_url) as store:
        try:
            removed = store.remove_certificate(name)
        except InvalidCertificate as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from None
    if not removed:
        raise click.ClickException(f"no certificate for {name} (see `tun2g cert list`)")
    click.echo(f"removed certificate for {name}")


@cert.command("issue")
@acme_challenge_option("--challenge")
@click.argument("name")
@acme_options
@_storage_option
def issue(name, acme_directory, acme_email, acme_ca_bundle, acme_challenge, storage_url):
    """Order a certificate for the routed NAME by ACME (HTTP-01 on the servers' public HTTP port,
    or --challenge tls-alpn-01 on their public HTTPS port).

    The servers sharing the store answer the challenge and serve the certificate within a second.
    """
    from tun2g.server.acme import IssuanceFailed, issue as acme_issue
    from tun2g.storage import NoSuchRoute, StorageError, normalize_domain

    try:
        domain = normalize_domain(name)
    except StorageError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    with _certificates(storage_url) as store:
        try:
            certificate = acme_issue(store, domain, directory_url=acme_directory, email=acme_email,
                                     ca_bundle=acme_ca_bundle, challenge=acme_challenge)
        except NoSuchRoute:
            raise click.ClickException(f"{domain} has no route: certificates are ordered only for routed names "
                                       f"(`tun2g route add {domain} --user U` first)") from None
        except IssuanceFailed as exc:
            raise click.ClickException(str(exc)) from None
    info = certificate.info
    click.echo(f"issued certificate for {info.name} (issuer {info.issuer}, expires {_when(info.not_after)})")
