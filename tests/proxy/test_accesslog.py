"""
The access log (one line per connection, text or JSON, to twistd's log or a
file of its own) and the bound on refusal lines, in memory: no sockets, no
wall clock.
"""

from __future__ import annotations

import ipaddress
import json
import os

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogLevel,
    Logger,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.logger import _logger as twisted_logger_module
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from shardtcp.config import ConfigError, parse_config
from shardtcp.model import ListenerConfig
from shardtcp.proxy.accesslog import (
    ACCESS_FIELDS,
    AccessLog,
    AccessLogError,
    RefusalLimiter,
    format_text,
    source_network,
)

from tests.config.test_sections import minimal, no_size
from tests.proxy.test_listener import Harness
from tests.support import client_hello

SAMPLE = {
    "id": "c1",
    "client": "198.51.100.7:51515",
    "listener": "edge",
    "service": "api",
    "shard": "api-fra-1",
    "sni": "api.example.test",
    "bytes_up": 12,
    "bytes_down": 3400,
    "peek": 0.0015,
    "connect": 0.25,
    "total": 2.0,
    "close": "client",
}


def _access_harness(form: str = "json", **kw):
    """A Harness whose access lines land in a list of dicts."""
    h = Harness(**kw)
    events: list = []
    h.context.access = AccessLog(form, observer=events.append)
    h.events = events
    h.lines = lambda: [e["access"] for e in events]
    return h


class AccessLineTests(SynchronousTestCase):
    """What a connection's access line says, for each way it ends."""

    def test_spliced_connection_line(self) -> None:
        """
        A spliced connection ended by the client gives exactly one line with
        its id, client, listener, service, shard, SNI, bytes each way and
        the peek, connect and total durations as the clock measured them.
        """
        h = _access_harness()
        protocol, transport = h.connect_client()
        h.clock.advance(0.5)
        protocol.dataReceived(client_hello())
        h.clock.advance(0.25)
        upstream, up = h.connector.succeed()
        h.clock.advance(2.0)
        protocol.dataReceived(b"ping")
        upstream.dataReceived(b"pong-pong")
        self.assertEqual(h.lines(), [])
        protocol.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionLost()))
        [line] = h.lines()
        self.assertEqual(set(line), set(ACCESS_FIELDS))
        self.assertEqual(
            line,
            {
                "id": protocol.connection_id,
                "client": "198.51.100.7:51515",
                "listener": "edge",
                "service": "api",
                "shard": h.connector.attempts[0][0].shard_id,
                "sni": "api.example.test",
                "bytes_up": len(client_hello()) + 4,
                "bytes_down": 9,
                "peek": 0.5,
                "connect": 0.25,
                "total": 2.75,
                "close": "client",
            },
        )

    def test_shard_line_trailing_bytes_count_up(self) -> None:
        """
        Bytes sent in the same segment as a ``SHARD`` line reach the shard
        and count as bytes up (they were counted as 0 before), in the
        access line and in the bytes metric.
        """
        h = _access_harness(listener=ListenerConfig(name="edge", listen="tcp:0", identify=("line",)))
        protocol, transport = h.connect_client()
        protocol.dataReceived(b"SHARD api\r\nhello shard")
        upstream, up = h.connector.succeed()
        self.assertTrue(up.value().endswith(b"hello shard"))
        # The shard answers before it goes (a silent close would be retried
        # on another shard as an empty response).
        upstream.dataReceived(b"!")
        upstream.connectionLost(Failure(ConnectionLost()))
        protocol.connectionLost(Failure(ConnectionLost()))
        [line] = h.lines()
        self.assertEqual((line["bytes_up"], line["bytes_down"], line["sni"]), (11, 1, None))
        self.assertEqual(line["close"], "shard")
        self.assertEqual(h.metrics.value("shardtcp_bytes_total", listener="edge", direction="up"), 11.0)

    def test_end_reason_overrides_the_side(self) -> None:
        """
        A connection the proxy closes on purpose (``end_reason`` set, as a
        drain or shutdown does) says that reason, not the side that closed.
        """
        h = _access_harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed()
        protocol.end_reason = "drain"
        protocol.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([line["close"] for line in h.lines()], ["drain"])

    def test_refused_line(self) -> None:
        """A refusal's line says ``refused:<reason>``, 0 bytes, no shard, no connect time."""
        h = _access_harness()
        protocol, transport = h.connect_client()
        h.clock.advance(0.125)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        [line] = h.lines()
        self.assertEqual(line["close"], "refused:not_tls")
        self.assertEqual((line["service"], line["shard"], line["connect"], line["peek"]), (None, None, None, None))
        self.assertEqual((line["bytes_up"], line["bytes_down"], line["total"]), (0, 0, 0.125))

    def test_unreachable_line_has_peek_and_service(self) -> None:
        """A connection refused after every shard failed names its service and peek time."""
        h = _access_harness()
        protocol, transport = h.connect_client()
        h.clock.advance(0.5)
        protocol.dataReceived(client_hello())
        h.connector.fail(0, "refused")
        h.connector.fail(1, "refused")
        [line] = h.lines()
        self.assertEqual((line["close"], line["service"], line["peek"]), ("refused:shard_unreachable", "api", 0.5))

    def test_client_gone_while_connecting(self) -> None:
        """A client that leaves before the shard is connected: ``close`` is ``client``."""
        h = _access_harness()
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([line["close"] for line in h.lines()], ["client"])

    def test_untrusted_proxy_line(self) -> None:
        """A refusal by the PROXY-header reader (accept_proxy) has its line too."""
        listener = ListenerConfig(
            name="edge", listen="tcp:0", accept_proxy=True, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)
        )
        h = _access_harness(listener=listener)
        h.connect_client()
        [line] = h.lines()
        self.assertEqual((line["close"], line["client"], line["listener"]), ("refused:untrusted_proxy", "198.51.100.7:51515", "edge"))

    def test_off_writes_nothing(self) -> None:
        """``access = "off"``: a whole connection writes no access event."""
        h = Harness()
        events: list = []
        h.context.access = AccessLog("off", observer=events.append)
        protocol, transport = h.connect_client()
        protocol.dataReceived(client_hello())
        upstream, up = h.connector.succeed()
        protocol.connectionLost(Failure(ConnectionLost()))
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(events, [])


class FormTests(SynchronousTestCase):
    """The text and JSON forms, in twistd's log and in a file of their own."""

    def test_text_event(self) -> None:
        """The text form is one event in ``shardtcp.access`` whose text is the line."""
        events: list = []
        AccessLog("text", observer=events.append).write(SAMPLE)
        [event] = events
        self.assertEqual(event["log_namespace"], "shardtcp.access")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            formatEvent(event),
            "c1 198.51.100.7:51515 edge api/api-fra-1 sni=api.example.test "
            "up=12 down=3400 peek=0.002 connect=0.250 total=2.000 close=client",
        )

    def test_text_unknowns_are_dashes(self) -> None:
        """What a connection never had is written ``-``."""
        fields = dict(SAMPLE, service=None, shard=None, sni=None, peek=None, connect=None, close="refused:eof")
        self.assertEqual(
            format_text(fields),
            "c1 198.51.100.7:51515 edge -/- sni=- up=12 down=3400 peek=- connect=- total=2.000 close=refused:eof",
        )

    def test_text_with_braces_renders_as_itself(self) -> None:
        """The event's format is the escaped line: braces in a value come out once, as written."""
        events: list = []
        AccessLog("text", observer=events.append).write(dict(SAMPLE, close="x{0}y}}{{"))
        [event] = events
        self.assertTrue(formatEvent(event).endswith(" close=x{0}y}}{{"))
        self.assertEqual(event["line"], formatEvent(event))
        self.assertEqual(event["log_flattened"], {})
        # as twistd's file observer writes it, and as a JSON log keeps it
        self.assertTrue(formatEventAsClassicLogText(event).endswith(" close=x{0}y}}{{\n"))
        self.assertEqual(formatEvent(eventFromJSON(eventAsJSON(event))), event["line"])

    def test_json_event(self) -> None:
        """The JSON form's text is one JSON object holding every field."""
        events: list = []
        AccessLog("json", observer=events.append).write(SAMPLE)
        text = formatEvent(events[0])
        self.assertNotIn("\n", text)
        self.assertEqual(json.loads(text), SAMPLE)

    def test_file_json_lines_and_reopen(self) -> None:
        """
        With a file, each connection is one JSON line; after the file is
        renamed (logrotate), ``reopen()`` starts a new file and the old one
        keeps exactly what was written before.
        """
        path = self.mktemp()
        log = AccessLog("json", path)
        verifyObject(ILogObserver, log.file)
        log.write(SAMPLE)
        log.write(dict(SAMPLE, id="c2"))
        os.rename(path, path + ".1")
        log.reopen()
        log.write(dict(SAMPLE, id="c3"))
        log.close()
        with open(path + ".1") as f:
            self.assertEqual([json.loads(line)["id"] for line in f], ["c1", "c2"])
        with open(path) as f:
            self.assertEqual([json.loads(line)["id"] for line in f], ["c3"])

    def test_event_as_logger_info_makes_it(self) -> None:
        """
        Without a file, the event handed to the observer has exactly the
        keys and values ``Logger.info`` gives it (time fixed), in text and
        JSON form.
        """
        from shardtcp.proxy import accesslog

        self.patch(accesslog, "time", lambda: 1234.5)
        for form, render in (("text", format_text), ("json", accesslog.format_json)):
            events: list = []
            log = AccessLog(form, observer=events.append)
            log.write(SAMPLE)
            line = render(SAMPLE)
            expected: list = []
            reference = Logger(namespace="shardtcp.access", observer=expected.append)
            self.patch(twisted_logger_module, "time", lambda: 1234.5)
            reference.info(accesslog._literal(line), line=line, access=SAMPLE, log_flattened={})
            expected[0]["log_logger"] = log._log
            self.assertEqual(events, expected)
            self.assertEqual(list(events[0]), list(expected[0]))
            self.assertEqual(formatEvent(events[0]), line)

    def test_file_written_without_the_logger(self) -> None:
        """
        With a file, the line is written straight to it: no event reaches
        twisted.logger's global publisher, and the file's bytes are the
        text line.
        """
        from twisted.logger import globalLogPublisher

        seen: list = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        path = self.mktemp()
        log = AccessLog("text", path)
        self.patch(log._log, "emit", lambda *a, **kw: self.fail("the access line went through the logger"))
        log.write(SAMPLE)
        log.close()
        self.assertEqual([e for e in seen if e.get("log_namespace") == "shardtcp.access"], [])
        with open(path) as f:
            self.assertEqual(f.read(), format_text(SAMPLE) + "\n")

    def test_file_text(self) -> None:
        """The text form in a file is the same line as in twistd's log, nothing around it."""
        path = self.mktemp()
        log = AccessLog("text", path)
        log.write(SAMPLE)
        log.close()
        with open(path) as f:
            self.assertEqual(f.read(), format_text(SAMPLE) + "\n")

    def test_unopenable_file(self) -> None:
        """A file that cannot be opened is one line naming the key and the path."""
        path = os.path.join(self.mktemp(), "missing-dir", "access.log")
        with self.assertRaises(AccessLogError) as caught:
            AccessLog("text", path)
        self.assertEqual(str(caught.exception), f"log.access_file: cannot open {path}: No such file or directory")

    def test_reopen_failure_keeps_old_file(self) -> None:
        """When reopening fails, lines keep going to the old file."""
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "access.log")
        log = AccessLog("text", path)
        os.rename(path, path + ".1")
        # Make the path unopenable: a directory of that name.
        os.mkdir(path)
        log.reopen()
        log.write(SAMPLE)
        log.close()
        with open(path + ".1") as f:
            self.assertEqual(f.read(), format_text(SAMPLE) + "\n")

    def test_config_access_file(self) -> None:
        """
        ``[log] access = "json"`` is accepted now, and ``access_file`` is
        read relative to the configuration's folder; ``off`` and unknown
        keys are as before.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        data = minimal()
        data["log"] = {"access": "json", "access_file": "logs/access.log"}
        config = parse_config(data, folder, check_files=False, token_size=no_size)
        self.assertEqual(config.log.access, "json")
        self.assertEqual(config.log.access_file, os.path.join(folder, "logs", "access.log"))
        data["log"] = {"access": "json", "access_file": "a\x00b"}
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, folder, check_files=False, token_size=no_size)
        self.assertEqual(caught.exception.problems, ["log.access_file: the path contains a NUL byte"])

    def test_config_access_file_folder_checked(self) -> None:
        """
        When files are checked (check-config, start-up), an access file in
        a folder that does not exist is one problem line; an existing
        folder passes.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "logs"))
        from shardtcp.config._reader import Reader
        from shardtcp.config._sections import _read_log

        reader = Reader(folder, check_files=True)
        self.assertEqual(_read_log(reader, {"log": {"access_file": "logs/access.log"}}).access_file, os.path.join(folder, "logs", "access.log"))
        self.assertEqual(reader.problems, [])
        reader = Reader(folder, check_files=True)
        _read_log(reader, {"log": {"access_file": "nowhere/access.log"}})
        self.assertEqual(reader.problems, [f"log.access_file: the folder {os.path.join(folder, 'nowhere')} does not exist"])


class RefusalLimiterTests(SynchronousTestCase):
    """The bound on refusal lines: N per interval per (reason, network), summary exact."""

    def limiter(self, lines: int = 3, interval: float = 10.0, **kw):
        clock = Clock()
        events: list = []

        from twisted.logger import Logger

        limiter = RefusalLimiter(clock, lines=lines, interval=interval, log=Logger(observer=events.append), **kw)
        return clock, limiter, events

    def test_exactly_n_then_suppressed_and_summarised(self) -> None:
        """
        At one instant, exactly ``lines`` refusals are allowed and the next
        is suppressed; after the interval one summary line gives the exact
        number suppressed.
        """
        clock, limiter, events = self.limiter(lines=3)
        allowed = [limiter.allow("not_tls", "203.0.113.9") for _ in range(3)]
        self.assertEqual(allowed, [True, True, True])
        self.assertFalse(limiter.allow("not_tls", "203.0.113.9"))
        for _ in range(6):
            limiter.allow("not_tls", "203.0.113.77")  # same /24
        self.assertEqual(limiter.suppressed(), 7)
        clock.advance(9.999)
        self.assertEqual(events, [])
        clock.advance(0.001)
        [summary] = events
        self.assertEqual(
            formatEvent(summary),
            "7 refusal lines (not_tls) from 203.0.113.0/24 suppressed in the last 10s (over 3 lines per 10s)",
        )
        self.assertEqual(summary["suppressed"], 7)
        self.assertEqual(limiter.suppressed(), 0)

    def test_no_summary_when_nothing_suppressed(self) -> None:
        """Exactly ``lines`` refusals: no summary is ever written, no timer left behind."""
        clock, limiter, events = self.limiter(lines=3)
        for _ in range(3):
            self.assertTrue(limiter.allow("eof", "203.0.113.9"))
        clock.advance(100)
        self.assertEqual(events, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refill_rate(self) -> None:
        """Tokens come back at ``lines / interval``: one line per 10/3 s here, not before."""
        clock, limiter, events = self.limiter(lines=3)
        for _ in range(3):
            limiter.allow("eof", "203.0.113.9")
        clock.advance(10 / 3 - 0.01)
        self.assertFalse(limiter.allow("eof", "203.0.113.9"))
        clock.advance(0.02)
        self.assertTrue(limiter.allow("eof", "203.0.113.9"))
        self.assertFalse(limiter.allow("eof", "203.0.113.9"))

    def test_keys_by_reason_and_network(self) -> None:
        """Another reason, another /24 or another IPv6 /64 has its own bucket."""
        clock, limiter, events = self.limiter(lines=1)
        self.assertTrue(limiter.allow("eof", "203.0.113.9"))
        self.assertFalse(limiter.allow("eof", "203.0.113.10"))
        self.assertTrue(limiter.allow("not_tls", "203.0.113.9"))
        self.assertTrue(limiter.allow("eof", "203.0.114.9"))
        self.assertTrue(limiter.allow("eof", "2001:db8:1:2::1"))
        self.assertFalse(limiter.allow("eof", "2001:db8:1:2:ffff::9"))
        self.assertTrue(limiter.allow("eof", "2001:db8:1:3::1"))

    def test_source_network(self) -> None:
        """The source network is the /24 or the /64, as text."""
        self.assertEqual(source_network("198.51.100.7"), "198.51.100.0/24")
        self.assertEqual(source_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(source_network(None), "-")

    def test_table_bound(self) -> None:
        """
        With ``max_keys`` networks tracked, the next new network shares the
        reason's ``*`` bucket: the table never grows past max_keys plus one
        per reason, whatever the number of sources.
        """
        clock, limiter, events = self.limiter(lines=1, max_keys=4)
        for i in range(4):
            self.assertTrue(limiter.allow("eof", f"10.0.{i}.1"))
        self.assertTrue(limiter.allow("eof", "10.0.200.1"))
        self.assertFalse(limiter.allow("eof", "10.0.201.1"))
        for i in range(1000):
            limiter.allow("eof", f"10.{i // 256}.{i % 256}.2")
        self.assertEqual(len(limiter._buckets), 5)
        clock.advance(10)
        # The shared key suppressed the most: its summary comes first.
        self.assertIn("from * suppressed", formatEvent(events[0]))
        self.assertEqual(sum(e["suppressed"] for e in events), 1 + 1000)

    def test_total_bound_over_all_keys(self) -> None:
        """
        ``total_lines`` bounds the lines of every key together: with 3 per
        network and 5 in all, two networks get 5 lines, the sixth is
        suppressed though its own network still has a token; the tokens
        come back at ``total_lines / interval``.
        """
        clock, limiter, events = self.limiter(lines=3, total_lines=5)
        allowed = [limiter.allow("eof", "10.0.1.1") for _ in range(3)]
        allowed += [limiter.allow("eof", "10.0.2.1") for _ in range(2)]
        self.assertEqual(allowed, [True] * 5)
        self.assertFalse(limiter.allow("eof", "10.0.2.1"))
        clock.advance(10 / 5 - 0.01)
        self.assertFalse(limiter.allow("eof", "10.0.3.1"))
        clock.advance(0.02)
        self.assertTrue(limiter.allow("eof", "10.0.3.1"))
        clock.advance(10)
        self.assertEqual(sorted((e["network"], e["suppressed"]) for e in events), [("10.0.2.0/24", 1), ("10.0.3.0/24", 1)])

    def test_summary_lines_bounded_counts_exact(self) -> None:
        """
        With suppressions from more networks than ``summary_lines``, the
        busiest get a line each and the rest one line together: 2 + 1 lines
        for 5 networks, and the counts add up exactly.
        """
        clock, limiter, events = self.limiter(lines=1, summary_lines=2)
        for network, extra in ((1, 5), (2, 4), (3, 3), (4, 2), (5, 1)):
            for _ in range(1 + extra):
                limiter.allow("eof", f"10.0.{network}.1")
        clock.advance(10)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "5 refusal lines (eof) from 10.0.1.0/24 suppressed in the last 10s (over 1 lines per 10s)",
                "4 refusal lines (eof) from 10.0.2.0/24 suppressed in the last 10s (over 1 lines per 10s)",
                "6 more refusal lines from 3 other networks suppressed in the last 10s",
            ],
        )

    def test_counters_stay_exact(self) -> None:
        """
        Through a listener: 25 refusals from one source count 25 in the
        metric while 10 refusal lines (the default bound) are written and
        the summary says 15.
        """
        h = _access_harness()
        logged: list = []
        from twisted.logger import globalLogPublisher

        def observe(event):
            if event.get("log_namespace") == "shardtcp.connection":
                logged.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for _ in range(25):
            protocol, transport = h.connect_client()
            protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(h.rejected("not_tls"), 25.0)
        self.assertEqual(len([e for e in logged if e.get("reason") == "not_tls" and "id" in e]), 10)
        self.assertEqual(len(h.lines()), 10)
        h.clock.advance(10)
        [summary] = [e for e in logged if "suppressed" in e]
        self.assertEqual(summary["suppressed"], 15)

    def test_bad_bounds(self) -> None:
        """A bound of 0 lines or a non-positive interval is refused."""
        with self.assertRaises(ValueError):
            RefusalLimiter(Clock(), lines=0)
        with self.assertRaises(ValueError):
            RefusalLimiter(Clock(), interval=0)
        with self.assertRaises(ValueError):
            RefusalLimiter(Clock(), total_lines=0)


class AccessFileServiceTests(TestCase):
    """``[log] access_file`` through the service tree, over real loopback sockets."""

    timeout = 60

    async def test_access_file_and_reopen_logs(self) -> None:
        """
        A proxy built from a configuration with ``access = "json"`` and
        ``access_file`` writes each verified connection's line to that file
        only; after the file is renamed, ``ProxyService.reopen_logs()`` (what
        SIGUSR1 calls) sends the next line to a new file of the same name.
        """
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from tests.e2e import harness as e2e

        from twisted.logger import globalLogPublisher

        elsewhere: list = []

        def observe(event) -> None:
            if event.get("log_namespace") == "shardtcp.access":
                elsewhere.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        deployment = e2e.Deployment(self, reactor)
        shard = deployment.add_shard("api-fra-1", e2e.FRANKFURT)
        path = os.path.join(deployment.directory, "access.log")
        port = deployment.start_proxy_text(
            e2e.listener_toml()
            + e2e.service_toml([("api-fra-1", shard.port, "")])
            + '[log]\naccess = "json"\naccess_file = "access.log"\n'
        )

        def lines(name: str) -> list:
            if not os.path.exists(name):
                return []
            with open(name) as f:
                return [json.loads(line) for line in f]

        first = await deferToThread(e2e.plain_tls_exchange, port, deployment.ca_path, payload=b"one\n")
        self.assertTrue(await e2e.wait_for(lambda: len(lines(path)) == 1, 10.0))
        os.rename(path, path + ".1")
        deployment.proxy.reopen_logs()
        second = await deferToThread(e2e.plain_tls_exchange, port, deployment.ca_path, payload=b"two\n")
        self.assertTrue(await e2e.wait_for(lambda: len(lines(path)) == 1, 10.0))
        [old], [new] = lines(path + ".1"), lines(path)
        for line, got in ((old, first), (new, second)):
            self.assertEqual(line["client"], f"127.0.0.1:{got['local'][1]}")
            self.assertEqual((line["shard"], line["sni"]), ("api-fra-1", e2e.SERVICE_NAME))
            # Which side's close reaches the proxy first is up to the two peers.
            self.assertIn(line["close"], ("client", "shard"))
            self.assertGreater(line["bytes_up"], 4)
            self.assertGreater(line["bytes_down"], len(got["hello"]))
        self.assertNotEqual(old["id"], new["id"])
        self.assertEqual(elsewhere, [])
