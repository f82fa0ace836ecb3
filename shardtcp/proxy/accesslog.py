# -*- test-case-name: tests.proxy.test_accesslog -*-
"""
The access log (one line per connection at its end) and the bound on
refusal lines.

``AccessLog`` turns a connection's end into one ``twisted.logger`` event in
the ``shardtcp.access`` namespace: ``text`` events go to twistd's log like
any other, ``json`` events carry the line as one JSON object, and with
``[log] access_file`` they are written straight to an ``AccessLogFile``
instead (no logger event on the way: nothing else observes them), whose
``reopen()`` is what SIGUSR1 calls after logrotate moved the file.  The
line is built once per connection from plain values; nothing is kept per
event on the way.

``RefusalLimiter`` bounds what refusals write under attack: a token bucket
of ``lines`` per ``interval`` for each (reason, source network), the source
network being the client's /24 (IPv4) or /64 (IPv6).  What it suppresses is
counted and said in one summary line per key when its interval ends
(``shardtcp.loglimit.LineLimiter``, which also bounds the lines about
failing shards).  It only decides about log lines: the metrics count every
refusal.
"""

from __future__ import annotations

import ipaddress
import json
from time import time
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogLevel, Logger, globalLogPublisher
from zope.interface import implementer

from shardtcp.loglimit import LineLimiter

__all__ = [
    "ACCESS_FIELDS",
    "AccessLog",
    "AccessLogError",
    "AccessLogFile",
    "RefusalLimiter",
    "format_text",
    "source_network",
]

#: The fields of an access line, in the order the text form writes them.
ACCESS_FIELDS = (
    "id",
    "client",
    "listener",
    "service",
    "shard",
    "sni",
    "bytes_up",
    "bytes_down",
    "peek",
    "connect",
    "total",
    "close",
)


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_text(fields: dict) -> str:
    """
    The text form of one access line (``-`` for what is not known):
    ``{id} {client} {listener} {service}/{shard} sni={sni} up={bytes_up}
    down={bytes_down} peek={peek} connect={connect} total={total}
    close={close}``.
    """
    return (
        f"{fields['id']} {fields['client'] or '-'} {fields['listener']} "
        f"{fields['service'] or '-'}/{fields['shard'] or '-'} sni={fields['sni'] or '-'} "
        f"up={fields['bytes_up']} down={fields['bytes_down']} peek={_seconds(fields['peek'])} "
        f"connect={_seconds(fields['connect'])} total={_seconds(fields['total'])} close={fields['close']}"
    )


def _literal(line: str) -> str:
    """``line`` as a log format that renders as itself (no fields to look up)."""
    return line.replace("{", "{{").replace("}", "}}")


def format_json(fields: dict) -> str:
    """The JSON form of one access line: one object, no newline inside."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True)


class AccessLogError(Exception):
    """The access file cannot be opened (one line naming it and why)."""


_problems = Logger(namespace="shardtcp.log")


@implementer(ILogObserver)
class AccessLogFile:
    """
    Writes ``shardtcp.access`` events to a file of its own, one line each.

    The file is opened for appending and each line is written whole (one
    ``write`` per connection), so a reader never sees half a line.
    ``reopen()`` closes it and opens the same path again: after logrotate
    has renamed the file, new lines go to a new file of that name.
    """

    def __init__(self, path: str, form: str) -> None:
        self.path = path
        self._format = format_json if form == "json" else format_text
        self._file = self._open()

    def _open(self):
        # Line-buffered text: one write(2) per line.
        try:
            return open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise AccessLogError(f"log.access_file: cannot open {self.path}: {e.strerror or e}") from None

    def __call__(self, event: dict) -> None:
        fields = event.get("access")
        if fields is not None:
            self.write_fields(fields)

    def write_fields(self, fields: dict) -> None:
        """Write one access line (``ACCESS_FIELDS``) straight to the file."""
        if self._file is not None:
            self._file.write(self._format(fields) + "\n")

    def reopen(self) -> None:
        """
        Open ``path`` again and close the old file (after log rotation).
        When it cannot be opened, lines keep going to the old file and the
        problem is logged: losing the access log is worse than a late rotation.
        """
        try:
            new = self._open()
        except AccessLogError as e:
            _problems.error("{problem}; still writing to the old file", problem=str(e))
            return
        old, self._file = self._file, new
        if old is not None:
            old.close()

    def close(self) -> None:
        old, self._file = self._file, None
        if old is not None:
            old.close()


class AccessLog:
    """
    Where connections' ends are written, per ``[log]``.

    ``form`` is ``text``, ``json`` or ``off``; ``path`` (``[log]
    access_file``) sends the lines to an ``AccessLogFile`` instead of
    twistd's log.  ``enabled`` is checked by the connection path before it
    gathers anything, so ``off`` costs one attribute read per connection.
    """

    def __init__(self, form: str = "text", path: Optional[str] = None, *, observer=None) -> None:
        self.form = form
        self.enabled = form != "off"
        self.file: Optional[AccessLogFile] = None
        if self.enabled and path is not None and observer is None:
            self.file = AccessLogFile(path, form)
            observer = self.file
        self._log = Logger(
            namespace="shardtcp.access", observer=observer if observer is not None else globalLogPublisher
        )
        self._json = form == "json"

    def write(self, fields: dict) -> None:
        """One connection ended; ``fields`` has every name in ``ACCESS_FIELDS``."""
        if not self.enabled:
            return
        if self.file is not None:
            # Only the file observes these lines: no logger event, no
            # publisher, no time stamp it would not write.
            self.file.write_fields(fields)
        else:
            # The line is the event's format, escaped, and the event says it
            # is flattened with no fields: a log file renders it by splitting
            # the format once, without string.Formatter's field lookups.  The
            # event is the one ``Logger.info`` would emit, handed to the same
            # observer without its level check and keyword copying.
            line = format_json(fields) if self._json else format_text(fields)
            log = self._log
            log.observer(
                {
                    "line": line,
                    "access": fields,
                    "log_flattened": {},
                    "log_logger": log,
                    "log_level": LogLevel.info,
                    "log_namespace": log.namespace,
                    "log_source": log.source,
                    "log_format": _literal(line),
                    "log_time": time(),
                }
            )

    def reopen(self) -> None:
        """Reopen the access file, if there is one (SIGUSR1)."""
        if self.file is not None:
            self.file.reopen()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def source_network(ip: Optional[str]) -> str:
    """The /24 (IPv4) or /64 (IPv6) a client address belongs to, as text."""
    if not ip:
        return "-"
    if ":" not in ip:
        head, _, _ = ip.rpartition(".")
        return f"{head}.0/24" if head else ip
    try:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    except ValueError:
        return ip


class RefusalLimiter(LineLimiter):
    """
    Bounds refusal lines: ``lines`` per ``interval`` seconds for each
    (reason, source network), and ``total_lines`` per interval over all of
    them (``shardtcp.loglimit.LineLimiter``).  ``allow(reason, ip)`` says
    whether a refusal line may be written now.
    """

    one_summary = (
        "{suppressed} refusal lines ({reason}) from {network} suppressed "
        "in the last {interval:g}s (over {lines} lines per {interval:g}s)"
    )
    rest_summary = "{suppressed} more refusal lines from {networks} other networks suppressed in the last {interval:g}s"
    key_field = "network"
    keys_field = "networks"
    log_namespace = "shardtcp.connection"

    def allow(self, reason: str, ip: Optional[str]) -> bool:
        """Whether to write a refusal line for ``reason`` from ``ip`` now."""
        return self.allow_key(reason, source_network(ip))
