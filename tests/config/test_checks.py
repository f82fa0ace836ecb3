"""
Tests for ``shardtcp.config._checks`` and the further keys of SPEC section 3:
what a listener may route to, tls health checks without a CA, and the
bounds and defaults of the further keys.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.config import (
    ConfigError,
    config_notes,
    parse_config,
    parse_rate,
)
from shardtcp.model import PerSourceConfig
from tests.config.test_sections import minimal, no_size


class _Helpers:
    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def parse(self, data: dict):
        return parse_config(data, self.folder(), check_files=False, token_size=no_size)

    def problems(self, data: dict) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            self.parse(data)
        return caught.exception.problems


def _set(data: dict, where: str, key: str, value: Any) -> None:
    """Set ``key`` in the table ``where`` (proxy, listener, service...) of ``data``."""
    if where == "listener":
        data["listener"][0][key] = value
    elif where == "service":
        data["service"]["api"][key] = value
    else:
        data.setdefault(where, {})[key] = value


class DefaultsTests(_Helpers, SynchronousTestCase):
    """What the further keys of SPEC section 3 are when left out."""

    def test_model(self) -> None:
        """Absent keys give the model's defaults."""
        config = self.parse(minimal())
        listener, service = config.listeners[0], config.services[0]
        self.assertEqual((config.proxy.workers, config.proxy.drain_timeout), (1, 30.0))
        self.assertIsNone(config.signing.jwks)
        self.assertEqual((listener.max_connections, listener.backlog), (0, 1024))
        self.assertEqual(listener.per_source, PerSourceConfig(max_connections=0, rate=0.0))
        self.assertEqual(config.log.access, "text")
        self.assertEqual((service.shard_key, service.bounded_load, service.owners), ("none", 1.25, ()))
        self.assertIsNone(service.health_ca)


class BoundsTests(_Helpers, SynchronousTestCase):
    """Each new key is bounded: the edges are valid values, one step past them is refused."""

    def outcome(self, where: str, key: str, value: Any) -> list[str]:
        data = minimal()
        _set(data, where, key, value)
        try:
            self.parse(data)
        except ConfigError as e:
            return e.problems
        return []

    def assertInBounds(self, where: str, key: str, value: Any) -> None:
        problems = self.outcome(where, key, value)
        self.assertEqual(problems, [], f"{key}={value!r}")

    def assertOutOfBounds(self, where: str, key: str, value: Any, fragment: str = "") -> None:
        problems = self.outcome(where, key, value)
        self.assertTrue(any(fragment in p for p in problems), f"{key}={value!r}: {problems}")

    def test_workers(self) -> None:
        """workers: 1..1024 or "auto"."""
        for good in (1, 1024, "auto"):
            self.assertInBounds("proxy", "workers", good)
        for bad in (0, 1025, "many", 1.5, True):
            self.assertOutOfBounds("proxy", "workers", bad, "proxy.workers: ")

    def test_workers_available(self) -> None:
        """workers = 2 and "auto" load with no problem (worker processes exist)."""
        for value in (2, "auto"):
            data = minimal()
            _set(data, "proxy", "workers", value)
            self.assertEqual(self.parse(data).proxy.workers, value)

    def test_drain_timeout(self) -> None:
        """drain_timeout: 0s..24h."""
        for good in ("0s", "24h"):
            self.assertInBounds("proxy", "drain_timeout", good)
        for bad in ("86401s", "30", 30):
            self.assertOutOfBounds("proxy", "drain_timeout", bad, "proxy.drain_timeout: ")

    def test_splice(self) -> None:
        """splice: "auto" or "userspace"; anything else refused by name."""
        for good in ("auto", "userspace"):
            self.assertInBounds("proxy", "splice", good)
        for bad in ("kernel", "Auto", "", 1, True):
            self.assertOutOfBounds("proxy", "splice", bad, "proxy.splice: expected one of")

    def test_max_pipes(self) -> None:
        """max_pipes: 2..1,000,000 (one connection needs two)."""
        for good in (2, 1_000_000):
            self.assertInBounds("proxy", "max_pipes", good)
        for bad in (1, 1_000_001, 0, "4096", 2.0, True):
            self.assertOutOfBounds("proxy", "max_pipes", bad, "proxy.max_pipes: ")

    def test_jwks(self) -> None:
        """jwks: a path; NUL bytes and non-strings refused."""
        self.assertOutOfBounds("signing", "jwks", "a\x00b", "NUL byte")
        self.assertOutOfBounds("signing", "jwks", 5, "expected a string")

    def test_max_connections(self) -> None:
        """listener max_connections: 0..10,000,000."""
        for good in (0, 10_000_000):
            self.assertInBounds("listener", "max_connections", good)
        for bad in (-1, 10_000_001, "5"):
            self.assertOutOfBounds("listener", "max_connections", bad, "listener[0].max_connections: ")

    def test_backlog(self) -> None:
        """listener backlog: 1..65535."""
        for good in (1, 65535):
            self.assertInBounds("listener", "backlog", good)
        for bad in (0, 65536):
            self.assertOutOfBounds("listener", "backlog", bad, "listener[0].backlog: ")

    def test_per_source(self) -> None:
        """per_source: max_connections 0..10,000,000 and a rate "N/s|m|h"; no other keys."""
        for good in ({"max_connections": 0}, {"max_connections": 10_000_000}, {"rate": "0/s"},
                     {"rate": "999999999/h"}):
            self.assertInBounds("listener", "per_source", good)
        for bad, fragment in (
            ({"max_connections": -1}, "per_source.max_connections: "),
            ({"max_connections": 10_000_001}, "per_source.max_connections: "),
            ({"rate": "10"}, "per_source.rate: "),
            ({"rate": "1000000000/s"}, "per_source.rate: "),
            ({"rate": "-1/s"}, "per_source.rate: "),
            ({"burst": 1}, "per_source.burst: unknown key"),
            (5, "per_source: expected a table"),
        ):
            self.assertOutOfBounds("listener", "per_source", bad, fragment)

    def test_parse_rate(self) -> None:
        """Rates convert to connections per second."""
        self.assertEqual(parse_rate("10/s"), 10.0)
        self.assertEqual(parse_rate("600/m"), 10.0)
        self.assertEqual(parse_rate("3600/h"), 1.0)
        for bad in ("10", "1.5/s", "10/d", "", 10, "١٠/s"):
            with self.assertRaises(ValueError):
                parse_rate(bad)

    def test_access_log(self) -> None:
        """[log] access: text, json or off; no other keys."""
        for good in ("text", "json", "off"):
            self.assertInBounds("log", "access", good)
        self.assertOutOfBounds("log", "access", "xml", "log.access: expected one of")
        self.assertOutOfBounds("log", "format", "x", "log.format: unknown key")

    def test_shard_key(self) -> None:
        """shard_key: one of SPEC 10's sources."""
        for good in ("none", "client-ip", "sni-label", "authority", "line-arg"):
            self.assertInBounds("service", "shard_key", good)
        self.assertOutOfBounds("service", "shard_key", "cookie", "service.api.shard_key: ")

    def test_bounded_load(self) -> None:
        """bounded_load: 1.0..100."""
        for good in (1.0, 1, 100):
            self.assertInBounds("service", "bounded_load", good)
        for bad in (0.99, 100.5, "2"):
            self.assertOutOfBounds("service", "bounded_load", bad, "service.api.bounded_load: ")

    def test_owners(self) -> None:
        """owners: key glob -> a non-empty list of distinct shard ids."""
        # Good tables need a shard_key: OwnersTests.test_good.
        for bad, fragment in (
            ({"a": []}, 'service.api.owners.a: list at least one shard id'),
            ({"a": ["api 1"]}, "service.api.owners.a[0]: shard id"),
            ({"a": ["x", "x"]}, "service.api.owners.a[1]: 'x' is listed twice"),
            ({"a": "api-1"}, "service.api.owners.a: expected a list of strings"),
            ({"a\nb": ["x"]}, 'service.api.owners."a\\u000ab": a key glob is printable'),
            (["a"], "service.api.owners: expected a table"),
        ):
            self.assertOutOfBounds("service", "owners", bad, fragment)


class OwnersTests(_Helpers, SynchronousTestCase):
    """[service.S.owners] names the service's own shards with well-formed globs, under a shard_key."""

    def owners(self, owners: Any, shard_key: str = "sni-label") -> list:
        data = minimal()
        service = data["service"]["api"]
        service["shard"].append({"id": "api-2", "address": "127.0.0.1:9002"})
        service["shard_key"] = shard_key
        service["owners"] = owners
        return self.outcome_of(data)

    def outcome_of(self, data: dict) -> list:
        try:
            self.parse(data)
        except ConfigError as e:
            return list(e.problems)
        return []

    def test_good(self) -> None:
        """Exact keys, globs and classes naming the service's shards pass."""
        self.assertEqual(
            self.owners({"t1": ["api-2"], "tenant-*": ["api-1", "api-2"], "[a-c]?x": ["api-1"], "[]]": ["api-1"]}),
            [],
        )

    def test_unknown_shard(self) -> None:
        """An id that is no shard of the service is named with its place."""
        self.assertEqual(
            self.owners({"t*": ["api-1", "api-9"]}),
            ["service.api.owners.\"t*\"[1]: no shard 'api-9' in service 'api'"],
        )

    def test_bad_globs(self) -> None:
        """An unclosed or empty class is refused (fnmatch would read it literally)."""
        self.assertEqual(
            self.owners({"t[a": ["api-1"]}),
            ["service.api.owners.\"t[a\": key glob 't[a': '[' at 1 is never closed"],
        )
        self.assertEqual(self.owners({"t[!": ["api-1"]})[0].split(": ", 1)[1], "key glob 't[!': '[' at 1 is never closed")

    def test_needs_a_shard_key(self) -> None:
        """owners without a shard_key mean nothing and are refused."""
        self.assertEqual(
            self.owners({"t": ["api-1"]}, shard_key="none"),
            ['service.api.owners: owners need a shard_key other than "none"'],
        )


class RouteTests(_Helpers, SynchronousTestCase):
    """A passthrough or plain listener never reaches an upstream_tls service."""

    def tls_service(self) -> dict:
        data = minimal()
        data["service"]["api"]["upstream_tls"] = True
        return data

    def test_passthrough_refused(self) -> None:
        """A passthrough listener identifying by SNI reaches the named service: refused."""
        [problem] = self.problems(self.tls_service())
        self.assertTrue(problem.startswith("listener[0].mode: a passthrough listener can route "
                                           "to service 'api', which has upstream_tls = true"), problem)

    def test_plain_by_line(self) -> None:
        """A plain listener with a SHARD line reaches every service, named or not."""
        data = self.tls_service()
        data["service"]["api"]["names"] = []
        data["listener"][0].update(mode="plain", identify=["line"])
        [problem] = self.problems(data)
        self.assertTrue(problem.startswith("listener[0].mode: a plain listener"), problem)

    def test_default_service(self) -> None:
        """default_service alone is a route."""
        data = self.tls_service()
        data["service"]["api"]["names"] = []
        data["listener"][0].update(identify=[], default_service="api")
        [problem] = self.problems(data)
        self.assertTrue(problem.startswith("listener[0].mode: "), problem)

    def test_unreachable_is_fine(self) -> None:
        """A service without names that no line or default can name is not reachable."""
        data = self.tls_service()
        data["service"]["api"]["names"] = []
        data["service"]["web"] = {
            "names": ["www.test"], "shard": [{"id": "web-1", "address": "127.0.0.1:80"}]
        }
        self.parse(data)

    def test_terminate_may(self) -> None:
        """A terminate listener may route to it."""
        data = self.tls_service()
        data["listener"][0].update(mode="terminate", default_certificate={"cert": "c", "key": "k"})
        self.parse(data)


class HealthTrustTests(_Helpers, SynchronousTestCase):
    """health_ca, and a note when a tls check has no CA."""

    def with_check(self, kind: str = "tls", **service: Any) -> dict:
        data = minimal()
        data["service"]["api"]["shard"][0]["health_check"] = {"kind": kind}
        data["service"]["api"].update(service)
        return data

    def test_note_without_ca(self) -> None:
        """A tls check with neither health_ca nor upstream_ca: one warning line at its path."""
        [note] = config_notes(self.parse(self.with_check()))
        self.assertTrue(note.startswith("service.api.shard[0].health_check: warning: "), note)
        self.assertIn("health_ca", note)

    def test_no_note(self) -> None:
        """health_ca, or upstream_ca with upstream_tls, or a tcp check: no note."""
        self.assertEqual(config_notes(self.parse(self.with_check(health_ca="ca.pem"))), [])
        self.assertEqual(config_notes(self.parse(self.with_check("tcp"))), [])
        data = self.with_check(upstream_tls=True, upstream_ca="ca.pem")
        data["listener"][0].update(mode="terminate", default_certificate={"cert": "c", "key": "k"})
        self.assertEqual(config_notes(self.parse(data)), [])

    def test_health_ca_path(self) -> None:
        """health_ca is a path resolved against the folder, checked when files are."""
        folder = self.folder()
        config = parse_config(
            self.with_check(health_ca="certs/ca.pem"), folder, check_files=False, token_size=no_size
        )
        self.assertEqual(config.services[0].health_ca, os.path.join(folder, "certs", "ca.pem"))
        with self.assertRaises(ConfigError) as caught:
            parse_config(self.with_check(health_ca="certs/ca.pem"), folder, token_size=no_size)
        self.assertIn(
            f"service.api.health_ca: cannot read {os.path.join(folder, 'certs', 'ca.pem')}: "
            "No such file or directory",
            caught.exception.problems,
        )


class ShardKeyTokenSizeTests(_Helpers, SynchronousTestCase):
    """check-config counts the longest shk a service's key source can give in the PolicyContext bound."""

    def test_key_length_per_source(self) -> None:
        """No shard key: no shk; client-ip 39, sni-label 63, authority and line-arg 253; a policy the key pushes over 1024 bytes is refused."""
        from shardtcp.config import parse_config
        from shardtcp.policy import worst_case_token_size

        seen: list = []

        def sizer(**kw):
            seen.append(kw.get("key_length"))
            return 0

        for source, expected in (("none", None), ("client-ip", 39), ("sni-label", 63),
                                 ("authority", 253), ("line-arg", 253)):
            data = minimal()
            data["service"]["api"]["shard_key"] = source
            seen.clear()
            parse_config(data, self.mktemp(), check_files=False, token_size=sizer)
            self.assertEqual(seen, [expected], source)
        data = minimal()
        data["service"]["api"]["shard_key"] = "line-arg"
        data["service"]["api"]["policy"] = {"acl": ["a" * 50, "b" * 50]}  # 675 bytes; 1025 with a 253-character shk
        e = self.assertRaises(
            ConfigError, parse_config, data, self.mktemp(), check_files=False, token_size=worst_case_token_size
        )
        self.assertTrue(any("over the 1024-byte limit" in p for p in e.problems), e.problems)
        data["service"]["api"]["shard_key"] = "none"
        parse_config(data, self.mktemp(), check_files=False, token_size=worst_case_token_size)

    def test_default_sizer_asked_once_per_id_length(self) -> None:
        """
        With the policy module's sizer, shards whose ids have one length
        share one answer, and the answer is the one it gives per shard: an
        ACL sized so that 2-character ids fit and 40-character ids do not
        refuses exactly the two 40-character shards, each by name.
        """
        from shardtcp.config import parse_config
        from shardtcp.config import _checks
        from shardtcp.policy import worst_case_token_size

        def size(shard_id: str, acl: list) -> int:
            return worst_case_token_size(
                issuer="edge-1", kid="policy-1", service_id="api", shard_id=shard_id,
                acl=acl, sni_length=len("api.example.test"), subject_length=None, key_length=None,
            )

        acl = ["a" * n for n in (1,)]
        while size("s" * 40, acl) <= 1024:
            acl.append("a" * 20)
        self.assertLessEqual(size("s" * 2, acl), 1024)
        self.assertGreater(size("s" * 2, acl + ["a" * 40]), 1024)  # the bound is near: lengths matter
        long_ids = ["L" * 40, "M" * 39 + "-"]
        data = minimal()
        data["service"]["api"]["policy"] = {"acl": acl}
        data["service"]["api"]["shard"] = [
            {"id": shard_id, "address": f"127.0.0.1:{9001 + i}"}
            for i, shard_id in enumerate(["s1", "s2", long_ids[0], "t3", long_ids[1]])
        ]
        calls: list = []

        def counting(**kw):
            calls.append(kw["shard_id"])
            self.assertEqual((kw["sni_length"], kw["subject_length"], kw["key_length"]), (16, None, None))
            return worst_case_token_size(**kw)

        self.patch(_checks, "default_token_size", lambda: counting)
        e = self.assertRaises(ConfigError, parse_config, data, self.mktemp(), check_files=False, token_size=counting)
        self.assertEqual(calls, ["s1", long_ids[0]])
        refused = [p for p in e.problems if "over the 1024-byte limit" in p]
        self.assertEqual(len(refused), 2)
        for shard_id, problem in zip(long_ids, refused):
            self.assertIn(f"for shard {shard_id!r} could reach {size(shard_id, acl)} bytes", problem)
