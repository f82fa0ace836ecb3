"""
A TLS layer on which a peer's ``close_notify`` is a half-close.

Used on both sides of the project: by the proxy for clients whose TLS it
terminates, and by the reference shard.  See ``HalfCloseTLSProtocol``.
"""

from __future__ import annotations

from OpenSSL.SSL import Error as SSLError, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer



@implementer(IHalfCloseableProtocol)
class HalfCloseTLSProtocol(BufferingTLSTransport):
    """
    A server-side TLS layer on which a ``close_notify`` from the peer is a
    half-close, not the end of the connection.

    Twisted's ``TLSMemoryBIOProtocol`` answers a ``close_notify`` with its own
    and closes the transport, so an application never learns that the peer
    has merely finished sending, and whatever it would still say is lost.
    Here, when the application protocol provides ``IHalfCloseableProtocol``
    and has not itself started closing, a ``close_notify`` is delivered as
    ``readConnectionLost``; the application may go on writing (TLS 1.3
    allows it, and OpenSSL only refuses writes after *sending*
    ``close_notify``), and its ``loseConnection`` then completes the TLS
    shutdown and closes the transport.  Otherwise Twisted's behaviour is kept.

    This overrides ``_flushReceiveBIO``, a private method of Twisted's TLS
    layer (checked against Twisted 26.x); the tests exercise it through real
    in-memory TLS handshakes so that a change there shows.
    """

    _read_closed = False
    _transport_gone = False

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, except for the ZeroReturnError branch.
        while not self._lostTLSConnection and not self._read_closed:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                half_closeable = IHalfCloseableProtocol(self.wrappedProtocol, None)
                if (
                    half_closeable is None
                    or self.disconnecting
                    or self._aborted
                    or self._transport_gone
                ):
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                else:
                    self._read_closed = True
                    half_closeable.readConnectionLost()
            except SSLError:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def readConnectionLost(self) -> None:
        """
        The peer closed its TCP write side.  After a ``close_notify`` that is
        expected and changes nothing; before one it is a truncated TLS
        stream, which OpenSSL reports as an error and which ends the
        connection as Twisted's TLS layer would.
        """
        if self._read_closed or self._lostTLSConnection:
            return
        self._tlsConnection.bio_shutdown()
        self._flushReceiveBIO()

    def writeConnectionLost(self) -> None:
        """Our TCP write side is closed: nothing more for TLS to do."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A close_notify found while draining a dead connection is no
        # half-close: there is no one left to answer.
        self._transport_gone = True
        super().connectionLost(reason)


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """A ``TLSMemoryBIOFactory`` building :class:`HalfCloseTLSProtocol` layers."""

    protocol = HalfCloseTLSProtocol


