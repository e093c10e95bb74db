"""Throwaway TLS material for the local stand-ins (Bedrock, KVS).

The real SDKs only talk TLS (awscrt needs ALPN ``h2`` for duplex streams), so every
emulator needs a certificate that a client can be told to trust. We mint a private CA
and a server certificate for ``127.0.0.1`` / ``localhost`` with the ``cryptography``
package into a temporary directory: nothing touches the system trust store, and the
client trusts only ``ca_file`` (see shared/reference/bedrock-sdk-notes.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertBundle:
    """Paths of the PEM files; ``directory`` is removed by :meth:`cleanup`."""

    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A server-side context presenting the leaf certificate (ALPN e.g. ``["h2"]``)."""
        return server_ssl_context(self, alpn)

    def client_context(self) -> ssl.SSLContext:
        """A client-side context that trusts only the throwaway CA (for Python clients)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        return ctx

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sonic_voice test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_certs(
    directory: str | Path | None = None,
    hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "localhost"),
    days: int = 2,
) -> CertBundle:
    """Make a CA (``basicConstraints`` critical CA:TRUE) and a server certificate.

    The server certificate carries a subjectAltName for every entry of ``hosts`` (IP
    addresses as IP SANs, names as DNS SANs) and ``extendedKeyUsage=serverAuth``: awscrt
    (s2n / OpenSSL) rejects leaf certificates without SAN, and some stacks reject a CA
    without the critical basicConstraints. ``directory`` defaults to a fresh temp dir.
    """
    out = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="sv-certs-"))
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("sonic_voice throwaway CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_file, cert_file, key_file = out / "ca.pem", out / "server.pem", out / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return CertBundle(out, ca_file, cert_file, key_file)


def server_ssl_context(bundle: CertBundle, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A TLS server context for ``bundle`` (TLS 1.2+, optional ALPN protocol list)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(bundle.cert_file), str(bundle.key_file))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    # RFC 7540 §9.2.2 forbids compression and renegotiation for h2.
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx
