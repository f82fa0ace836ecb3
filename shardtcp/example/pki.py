"""
A small certificate factory: a private certificate authority that issues
server and client certificates.

It exists for ``shardtcp demo`` (which needs a CA, certificates for its
listeners and shards, and client certificates for mutual TLS) and for the test
suite (which needs the same, plus certificates that are expired or not yet
valid). It is not meant to run a production PKI: keys are kept unencrypted in
memory and written unencrypted (mode 0600) when asked.

The certificates follow what strict verifiers (OpenSSL with
``X509_V_FLAG_X509_STRICT``, service-identity) expect: a critical
basicConstraints and keyUsage on every certificate, subject and authority key
identifiers, the names in subjectAltName (IP address strings become IP SANs)
and an extendedKeyUsage of serverAuth or clientAuth.

This module imports nothing of the project.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable, Optional, Union

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

#: Default lifetime of an issued certificate, counted from "now".
DEFAULT_LIFETIME = datetime.timedelta(days=30)
#: Default lifetime of the authority's own certificate.
CA_LIFETIME = datetime.timedelta(days=3650)
#: How far before "now" validity starts by default, so that clocks a little
#: behind still accept a freshly issued certificate.
BACKDATE = datetime.timedelta(hours=1)

KEY_TYPES = ("ec", "rsa")


def _generate_key(key_type: str) -> PrivateKey:
    """Make a new private key: EC P-256 (``"ec"``) or RSA 2048 (``"rsa"``)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}: expected one of {KEY_TYPES}")


def _key_pem(key: PrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    """Serialize a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _utc(when: datetime.datetime) -> datetime.datetime:
    """Make a datetime timezone-aware; a naive one is taken to be UTC."""
    if when.tzinfo is None:
        return when.replace(tzinfo=datetime.timezone.utc)
    return when


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN when ``name`` is an IP literal, otherwise a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_private(path: str, data: bytes) -> None:
    """
    Write ``data`` to ``path`` readable by the owner only (0600), also when the
    file already existed with wider permissions.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


@attrs.frozen
class Issued:
    """A certificate issued by a :class:`CertificateAuthority`, with its key."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: PrivateKey

    def write(self, directory: str, stem: str) -> tuple[str, str]:
        """
        Write ``<stem>.pem`` (the certificate) and ``<stem>.key`` (the private
        key, mode 0600) into ``directory``; return both paths, certificate
        first.
        """
        cert_path = os.path.join(directory, f"{stem}.pem")
        key_path = os.path.join(directory, f"{stem}.key")
        with open(cert_path, "wb") as f:
            f.write(self.cert_pem)
        _write_private(key_path, self.key_pem)
        return cert_path, key_path


class CertificateAuthority:
    """
    A self-signed certificate authority that issues leaf certificates.

    ``now`` fixes the moment validity periods are counted from (for tests that
    want reproducible dates); when it is ``None`` the current time is read at
    each issuance.
    """

    def __init__(
        self,
        common_name: str = "shardtcp test CA",
        *,
        key_type: str = "ec",
        now: Optional[datetime.datetime] = None,
    ) -> None:
        self._key_type = key_type
        self._now = _utc(now) if now is not None else None
        self.key: PrivateKey = _generate_key(key_type)
        start = self._current()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = self.key.public_key()
        self._ski = x509.SubjectKeyIdentifier.from_public_key(public)
        self.cert: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(start + CA_LIFETIME)
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
            .add_extension(self._ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem: bytes = _cert_pem(self.cert)
        self.key_pem: bytes = _key_pem(self.key)

    def _current(self) -> datetime.datetime:
        """The moment validity is counted from."""
        if self._now is not None:
            return self._now
        return datetime.datetime.now(datetime.timezone.utc)

    def _validity(
        self,
        not_before: Optional[datetime.datetime],
        not_after: Optional[datetime.datetime],
    ) -> tuple[datetime.datetime, datetime.datetime]:
        """
        Settle a validity period. By default it runs from an hour ago to 30
        days ahead; when only one end is given and the default other end would
        fall on its wrong side (an expired certificate asked for by a
        ``not_after`` in the past, say), the other end is moved to keep the
        period a sensible length.
        """
        now = self._current()
        start = _utc(not_before) if not_before is not None else None
        end = _utc(not_after) if not_after is not None else None
        if start is None:
            start = now - BACKDATE
            if end is not None and end <= start:
                start = end - DEFAULT_LIFETIME
        if end is None:
            end = now + DEFAULT_LIFETIME
            if end <= start:
                end = start + DEFAULT_LIFETIME
        if end <= start:
            raise ValueError(f"not_after ({end}) must be after not_before ({start})")
        return start, end

    def _issue(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: Optional[datetime.datetime],
        not_after: Optional[datetime.datetime],
    ) -> Issued:
        """Sign a leaf certificate for a new key with the given names and usage."""
        start, end = self._validity(not_before, not_after)
        key = _generate_key(self._key_type)
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key exchange (TLS 1.2 without ECDHE) needs it; EC keys must not.
                    key_encipherment=self._key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert_pem=_cert_pem(cert), key_pem=_key_pem(key), cert=cert, key=key)

    def issue_server(
        self,
        names: Iterable[str],
        *,
        common_name: Optional[str] = None,
        not_before: Optional[datetime.datetime] = None,
        not_after: Optional[datetime.datetime] = None,
    ) -> Issued:
        """
        Issue a TLS server certificate (extendedKeyUsage serverAuth) for
        ``names``: DNS names, and IP address literals which become IP address
        SANs. The subject's common name is ``common_name``, else the first name.
        """
        names = list(names)
        if not names and common_name is None:
            raise ValueError("a server certificate needs at least one name")
        cn = common_name if common_name is not None else names[0]
        return self._issue(
            cn,
            [_general_name(n) for n in names],
            ExtendedKeyUsageOID.SERVER_AUTH,
            not_before,
            not_after,
        )

    def issue_client(
        self,
        common_name: str,
        *,
        uri: Optional[str] = None,
        dns: Iterable[str] = (),
        not_before: Optional[datetime.datetime] = None,
        not_after: Optional[datetime.datetime] = None,
    ) -> Issued:
        """
        Issue a TLS client certificate (extendedKeyUsage clientAuth) with
        subject ``CN=common_name``, a URI SAN when ``uri`` is given (a SPIFFE
        id such as ``spiffe://example.test/orders``) and DNS SANs for ``dns``.
        """
        sans: list[x509.GeneralName] = []
        if uri is not None:
            sans.append(x509.UniformResourceIdentifier(uri))
        sans.extend(x509.DNSName(d) for d in dns)
        return self._issue(
            common_name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after
        )

    def write(self, directory: str, stem: str = "ca") -> str:
        """
        Write the authority's certificate to ``<stem>.pem`` in ``directory``
        (what a peer needs to trust it) and return its path. The authority's
        key is never written.
        """
        path = os.path.join(directory, f"{stem}.pem")
        with open(path, "wb") as f:
            f.write(self.cert_pem)
        return path
