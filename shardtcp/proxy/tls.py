"""
TLS at the proxy: terminating clients' TLS (origination lives in
``shardtcp.upstream``, shared with the health checker).

Termination chooses the certificate *before* the handshake starts.  The
listener has already peeked the ClientHello (to route it), so it knows the
server name and the service; ``ServerTLS.creator_for(name, require_cert)``
then hands back a connection creator bound to the right context:

* exact names first, then one-label wildcards, then ``default_certificate``;
* ``strict_sni``: a name without a certificate gets ``None`` and the listener
  answers with an ``unrecognized_name`` alert itself;
* ``require_cert``: the context sends ``FAIL_IF_NO_PEER_CERT`` so OpenSSL
  refuses a client without a certificate *in the handshake*, with its own
  alert, when the listener or the chosen service demands mTLS.

This is the txsni idea (a context per host) without the servername
callback: nothing runs inside an OpenSSL callback except ALPN selection,
which cannot raise.  Contexts are built once at start-up, so a bad
certificate file stops the proxy from starting rather than failing
connections later.
"""

from __future__ import annotations

from typing import Optional

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from shardtcp import proxyv2
from shardtcp.identify.names import NameTable
from shardtcp.model import CertificateConfig, ListenerConfig

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


@implementer(IOpenSSLServerConnectionCreator)
class _FixedContextCreator:
    """An ``IOpenSSLServerConnectionCreator`` over one prepared context."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _alpn_selector(offered_by_server: tuple):
    preferences = [p.encode("ascii") for p in offered_by_server]

    def select(connection, client_protocols):
        for protocol in preferences:
            if protocol in client_protocols:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _accept_preverified(connection, certificate, errno, depth, ok) -> bool:
    # OpenSSL's own chain verification decides; this only exists because
    # pyOpenSSL requires a callback.
    return bool(ok)


class ServerTLS:
    """The server-side TLS contexts of one terminating listener."""

    def __init__(self, listener: ListenerConfig) -> None:
        self._listener = listener
        entries: list = []
        for index, certificate in enumerate(listener.certificates):
            entries.append((str(index), certificate.names))
        # A NameTable gives exact-before-wildcard, one-label wildcards and
        # case-insensitivity, the same rules as service names.
        self._names = NameTable(entries)
        self._contexts: dict = {}
        for index, certificate in enumerate(listener.certificates):
            for require in (False, True):
                self._contexts[(str(index), require)] = self._context(certificate, require)
        if listener.default_certificate is not None:
            for require in (False, True):
                self._contexts[("default", require)] = self._context(listener.default_certificate, require)

    def _context(self, certificate: CertificateConfig, require_cert: bool) -> SSL.Context:
        listener = self._listener
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(_VERSIONS.get(listener.min_tls, SSL.TLS1_2_VERSION))
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.use_certificate_chain_file(certificate.cert)
        context.use_privatekey_file(certificate.key)
        context.check_privatekey()
        # Needed for session resumption when client certificates are asked for.
        context.set_session_id(f"shardtcp-{listener.name}"[:32].encode("ascii"))
        if listener.alpn:
            context.set_alpn_select_callback(_alpn_selector(tuple(listener.alpn)))
        if listener.client_ca:
            context.load_verify_locations(listener.client_ca)
            with open(listener.client_ca, "rb") as f:
                cas = x509.load_pem_x509_certificates(f.read())
            context.set_client_ca_list([crypto.X509.from_cryptography(c).get_subject() for c in cas])
            mode = SSL.VERIFY_PEER
            if require_cert or listener.require_client_cert:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            context.set_verify(mode, _accept_preverified)
        return context

    def creator_for(self, server_name: Optional[str], require_cert: bool = False):
        """
        The connection creator for ``server_name``, or None when no
        certificate serves it (always None for unknown names under
        ``strict_sni``).
        """
        key = self._names.lookup(server_name) if server_name else None
        if key is None:
            if self._listener.strict_sni and server_name:
                return None
            if self._listener.default_certificate is None:
                return None
            key = "default"
        return _FixedContextCreator(self._contexts[(key, require_cert)])

    @property
    def asks_client_cert(self) -> bool:
        return bool(self._listener.client_ca)


def client_identity(certificate: x509.Certificate) -> Optional[str]:
    """A client certificate's identity: SAN URI, else DNS name, else CN."""
    try:
        san = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return uris[0]
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    return common_name(certificate)


def common_name(certificate: x509.Certificate) -> Optional[str]:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def handshake_facts(connection: SSL.Connection):
    """
    What a completed server-side handshake says of the client:
    ``(encryption, authentication, subject, alpn, SSLInfo)``.
    """
    peer = connection.get_peer_certificate()
    alpn = connection.get_alpn_proto_negotiated() or None
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    if peer is not None:
        cert = peer.to_cryptography()
        # The context verifies with VERIFY_PEER and a callback that keeps
        # OpenSSL's verdict, so a certificate that failed verification ends
        # the handshake: one that is still here was verified.
        verify, verified = 0, True
        subject = client_identity(cert)
        cn = common_name(cert)
        # CERT_SESS (a certificate from a resumed session) is not reported:
        # pyOpenSSL does not say whether the session was resumed.
        flags = proxyv2.PP2_CLIENT_SSL | proxyv2.PP2_CLIENT_CERT_CONN
    else:
        verify, verified, subject, cn = 0, False, None, None
        flags = proxyv2.PP2_CLIENT_SSL
    info = proxyv2.SSLInfo(client=flags, verify=verify, version=version, cn=cn, cipher=cipher)
    if verified:
        return "mtls", ("mtls",), subject, alpn.decode("ascii", "replace") if alpn else None, info
    return "tls", ("none",), None, alpn.decode("ascii", "replace") if alpn else None, info
