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

    ``loseWriteConnection`` is the same half-close the other way: what was
    written is flushed, a ``close_notify`` goes out, then the TCP write side
    is shut down (``shutdown(SHUT_WR)``); later writes are dropped, and the
    peer's bytes are still read until its own ``close_notify`` or EOF.

    Once the connection is gone (``connectionLost`` may run synchronously
    while this layer is still reading, when the transport's write side was
    already shut down), OpenSSL's connection is released and no BIO is read
    or written again.

    This overrides ``_flushReceiveBIO``, ``_flushSendBIO`` and
    ``_unbufferPendingWrites``, private methods of Twisted's TLS layer
    (checked against Twisted 26.x); the tests exercise them through real
    in-memory TLS handshakes so that a change there shows.
    """

    _read_closed = False
    _transport_gone = False
    # loseWriteConnection was called / its close_notify went out
    _write_closed = False
    _close_notify_sent = False

    def _flushReceiveBIO(self) -> None:
        # Twisted's loop, except for the ZeroReturnError branch.
        while not self._lostTLSConnection and not self._read_closed and self._tlsConnection is not None:
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

    def _flushSendBIO(self) -> None:
        # Nothing to send once the connection is gone (its OpenSSL
        # connection is released in connectionLost).
        if self._tlsConnection is not None:
            super()._flushSendBIO()

    def loseWriteConnection(self) -> None:
        """
        Half-close our side: flush what was written, send ``close_notify``,
        then shut the TCP write side down.  Writes from now on are dropped;
        reading goes on.
        """
        if self._write_closed or self.disconnecting or self._lostTLSConnection or self._tlsConnection is None:
            return
        self._write_closed = True
        self._aggregator.flush()
        self._aggregator = _Discard()
        self.write = self._aggregator.write
        if not self._appSendBuffer:
            self._send_close_notify()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        # Bytes OpenSSL could not take before go out first, then the alert.
        if self._write_closed and not self._close_notify_sent and not self._appSendBuffer:
            self._send_close_notify()

    def _send_close_notify(self) -> None:
        if self._lostTLSConnection or self._tlsConnection is None:
            return
        self._close_notify_sent = True
        try:
            self._tlsConnection.shutdown()
        except SSLError:
            # Mid-handshake OpenSSL may refuse; the TCP half-close still
            # tells the peer we are done.
            pass
        self._flushSendBIO()
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        """
        The peer closed its TCP write side.  After a ``close_notify`` that is
        expected and changes nothing; before one it is a truncated TLS
        stream, which OpenSSL reports as an error and which ends the
        connection as Twisted's TLS layer would.
        """
        if self._read_closed or self._lostTLSConnection or self._tlsConnection is None:
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


class _Discard:
    """Stands in for the write aggregator once our side is half-closed."""

    def write(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """A ``TLSMemoryBIOFactory`` building :class:`HalfCloseTLSProtocol` layers."""

    protocol = HalfCloseTLSProtocol


