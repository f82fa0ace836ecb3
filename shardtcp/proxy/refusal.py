"""
How a refused connection is answered.

Every refusal has a reason from a fixed vocabulary (also the metrics label).
The answer depends on what the client spoke: a fatal TLS alert for a TLS
client, an HTTP status line for CONNECT and plain HTTP, ``ERR <reason>`` for
the line preamble, and nothing (just the close) when the input was not of
any protocol shardtcp knows.
"""

from __future__ import annotations

from shardtcp.identify.clienthello import AlertDescription, tls_alert

# reason -> (TLS alert description, HTTP status, HTTP reason phrase)
REASONS = {
    "malformed": (AlertDescription.decode_error, 400, "Bad Request"),
    "not_tls": (None, 400, "Bad Request"),
    "unrecognized": (None, 400, "Bad Request"),
    "too_large": (AlertDescription.handshake_failure, 400, "Bad Request"),
    # An HTTP preamble over its bound (8 KiB): 414 while still in the
    # request line, 431 once in the header fields (RFC 9112 section 3,
    # RFC 6585 section 5).
    "uri_too_long": (AlertDescription.handshake_failure, 414, "URI Too Long"),
    "header_too_large": (AlertDescription.handshake_failure, 431, "Request Header Fields Too Large"),
    "peek_timeout": (AlertDescription.handshake_failure, 408, "Request Timeout"),
    "eof": (None, 400, "Bad Request"),
    "no_service": (AlertDescription.unrecognized_name, 404, "Not Found"),
    "unknown_service": (AlertDescription.unrecognized_name, 404, "Not Found"),
    "denied": (AlertDescription.access_denied, 403, "Forbidden"),
    "threat_denied": (AlertDescription.access_denied, 403, "Forbidden"),
    "policy_encryption": (AlertDescription.access_denied, 403, "Forbidden"),
    "policy_authentication": (AlertDescription.access_denied, 403, "Forbidden"),
    # A service routing by shard key, a connection that names no key.
    "no_shard_key": (AlertDescription.unrecognized_name, 400, "Bad Request"),
    "no_shard": (AlertDescription.internal_error, 503, "Service Unavailable"),
    "shard_unreachable": (AlertDescription.internal_error, 503, "Service Unavailable"),
    "token_too_large": (AlertDescription.internal_error, 503, "Service Unavailable"),
    "internal": (AlertDescription.internal_error, 503, "Service Unavailable"),
    # The proxy itself is out of file descriptors, memory or time.
    "proxy_overloaded": (AlertDescription.internal_error, 503, "Service Unavailable"),
    "no_certificate": (AlertDescription.unrecognized_name, 404, "Not Found"),
    "untrusted_proxy": (None, 403, "Forbidden"),
    "bad_proxy_header": (None, 400, "Bad Request"),
    "handshake_timeout": (None, 408, "Request Timeout"),
}


def refusal_bytes(reason: str, protocol: str) -> bytes:
    """The bytes that tell a client of ``protocol`` why it is refused."""
    alert, status, phrase = REASONS.get(reason, REASONS["internal"])
    if protocol == "tls":
        return tls_alert(alert) if alert is not None else b""
    if protocol == "http":
        return (
            f"HTTP/1.1 {status} {phrase}\r\n"
            f"Content-Length: 0\r\nConnection: close\r\nX-Shardtcp-Reason: {reason}\r\n\r\n"
        ).encode("ascii")
    if protocol == "line":
        return f"ERR {reason}\r\n".encode("ascii")
    return b""
