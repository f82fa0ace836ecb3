"""
The bench's own shard: a threaded TCP server, TLS or plain, run as a process.

    python bench/backend.py [--cert PEM --key PEM]

It prints ``PORT n`` once listening and serves until its stdin closes (the
bench went away) or ``LIFETIME`` passes.  A connection may open with a
PROXY v2 header, which is skipped (16 fixed bytes, then the length they
announce; the signed PolicyContext in it is not verified here, its cost is
measured on its own); then the client names one operation in nine bytes
(``!cQ``): ``U`` read N bytes and answer their count, ``D`` send N bytes,
``R`` echo N bytes, ``E`` echo everything until the client closes, ``H``
hold the connection until the client closes it.

It imports nothing of shardtcp or of the bench, so it is the same program
for every target.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import struct
import sys
import threading
import time

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
OP = struct.Struct("!cQ")
CHUNK = 256 * 1024
LIFETIME = 900.0
SOCKET_TIMEOUT = 60.0
MAX_THREADS = 4096
MAX_ACCEPTS = 1_000_000


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError(f"peer closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _serve(raw: socket.socket, context, slots: threading.BoundedSemaphore) -> None:
    try:
        raw.settimeout(SOCKET_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if raw.recv(1, socket.MSG_PEEK) == b"\r":
            fixed = _recv_exact(raw, 16)
            if fixed[:12] != SIGNATURE:
                return
            (length,) = struct.unpack("!H", fixed[14:16])
            _recv_exact(raw, length)
        sock = context.wrap_socket(raw, server_side=True) if context is not None else raw
        op, n = OP.unpack(_recv_exact(sock, OP.size))
        if op == b"U":
            buf = memoryview(bytearray(CHUNK))
            got = 0
            while got < n:
                k = sock.recv_into(buf, min(CHUNK, n - got))
                if not k:
                    break
                got += k
            sock.sendall(struct.pack("!Q", got))
        elif op == b"D":
            block = memoryview(bytes(CHUNK))
            sent = 0
            while sent < n:
                k = min(CHUNK, n - sent)
                sock.sendall(block[:k])
                sent += k
        elif op == b"R":
            sock.sendall(_recv_exact(sock, n))
        elif op == b"E":
            # Echo everything until the client closes.
            for _ in range(1_000_000):
                data = sock.recv(CHUNK)
                if not data:
                    break
                sock.sendall(data)
        # After every operation (and for "H"): wait for the client to close.
        for _ in range(1_000_000):
            if not sock.recv(CHUNK):
                break
    except (OSError, EOFError, ValueError, struct.error):
        pass
    finally:
        raw.close()
        slots.release()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/backend.py")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    options = parser.parse_args()
    threading.stack_size(256 * 1024)
    context = None
    if options.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(options.cert, options.key)
        context.num_tickets = 0  # the client resumes nothing; don't pay for tickets
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    print(f"PORT {listener.getsockname()[1]}", flush=True)

    def watch_parent() -> None:
        sys.stdin.read()
        os._exit(0)

    def lifetime() -> None:
        time.sleep(LIFETIME)
        os._exit(3)

    threading.Thread(target=watch_parent, daemon=True).start()
    threading.Thread(target=lifetime, daemon=True).start()
    slots = threading.BoundedSemaphore(MAX_THREADS)
    for _ in range(MAX_ACCEPTS):
        raw, _ = listener.accept()
        if not slots.acquire(timeout=SOCKET_TIMEOUT):
            raw.close()
            continue
        threading.Thread(target=_serve, args=(raw, context, slots), daemon=True).start()


if __name__ == "__main__":
    main()
