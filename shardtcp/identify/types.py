# -*- test-case-name: tests.identify.test_detect -*-
"""
The values every identification method shares: what a method found
(``Identified``), how it refuses (``IdentifyError``), the protocol a
refusal is answered in (``AnswerProtocol``) and the seam a method plugs into
(``IIdentifyMethod``).

It imports nothing of the project, so the parsers, the detector and the
connection path can all import it without importing each other.
"""

from __future__ import annotations

import enum
from typing import Optional

from attrs import field, frozen
from zope.interface import Attribute, Interface

__all__ = ["AnswerProtocol", "IIdentifyMethod", "Identified", "IdentifyError"]


class AnswerProtocol(enum.StrEnum):
    """
    How a refusal is answered to the client: a TLS alert, an HTTP status
    line, an ``ERR`` line, or nothing (the bytes were of no known
    protocol).  Members are strings, equal to their values.
    """

    TLS = "tls"
    HTTP = "http"
    LINE = "line"
    NONE = "none"


def _answer_protocol(value: object) -> AnswerProtocol:
    # A member as it stands (every identification method passes one): the
    # enum's own lookup costs two Python frames per connection.
    return value if type(value) is AnswerProtocol else AnswerProtocol(value)


@frozen
class Identified:
    """
    What the first bytes said.

    ``name`` is the SNI or preamble name (None when there was none);
    ``protocol`` is how to answer a refusal; ``consume`` is how many leading
    bytes are the preamble's own and are not forwarded;
    ``reply_when_connected`` is written to the client once the shard is
    connected (CONNECT's 200); ``by_service_id`` says that ``name`` may also
    be a service id as it stands (the ``line`` preamble names a service,
    not a host): the router tries it as one when the name table selects
    nothing.  ``key`` is the shard key the ``line`` preamble's second word
    gave (``SHARD <service> <key>``), else None.
    """

    method: str
    protocol: AnswerProtocol = field(converter=_answer_protocol)
    name: Optional[str] = None
    alpn: tuple = ()
    tls: bool = False
    consume: int = 0
    reply_when_connected: bytes = b""
    by_service_id: bool = False
    key: Optional[str] = None


class IdentifyError(Exception):
    """
    The first bytes identify nothing usable.

    ``reason`` is a metrics slug; ``protocol`` (an ``AnswerProtocol``) says
    how to answer, ``NONE`` when the input was not of any known protocol.
    """

    def __init__(
        self, reason: str, message: str, protocol: str = AnswerProtocol.NONE
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.protocol = AnswerProtocol(protocol)


class IIdentifyMethod(Interface):
    """
    One way of identifying the service from a connection's first bytes.

    Implementations are listed in ``shardtcp.identify.detect.METHODS``
    under their ``name`` and built with one argument, the most bytes they
    may hold.
    """

    name = Attribute("The method's name in a listener's identify list.")
    protocol = Attribute("How a refusal is answered: an AnswerProtocol.")

    def feed(data: bytes) -> Optional[Identified]:
        """
        Feed the next bytes; return the ``Identified`` once known, else
        None. Raises ``IdentifyError``, and nothing else, on bad input.
        """
