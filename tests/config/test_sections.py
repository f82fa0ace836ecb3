"""
Tests for ``shardtcp.config``: TOML in, validated ``Config`` out, and every
problem named by its key path.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import config as config_module
from shardtcp.config import (
    ConfigError,
    check_config,
    load_config,
    parse_config,
    parse_duration,
)
from shardtcp.model import (
    Address,
    HealthCheckConfig,
    Location,
    PolicyConfig,
    RegistryConfig,
    Weights,
)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "etc", "shardtcp.toml")

MINIMAL_TOML = """\
[proxy]
id = "edge-1"

[signing]
private_key = "keys/policy.pem"
kid = "policy-1"

[[listener]]
name = "edge"
listen = "tcp:0:interface=127.0.0.1"

[service.api]
names = ["API.Example.test"]

[[service.api.shard]]
id = "api-1"
address = "127.0.0.1:9001"
"""


def minimal() -> dict:
    """A fresh copy of the smallest valid document, as tomllib decodes it."""
    return {
        "proxy": {"id": "edge-1"},
        "signing": {"private_key": "keys/policy.pem", "kid": "policy-1"},
        "listener": [{"name": "edge", "listen": "tcp:0:interface=127.0.0.1"}],
        "service": {
            "api": {
                "names": ["api.example.test"],
                "shard": [{"id": "api-1", "address": "127.0.0.1:9001"}],
            }
        },
    }


def no_size(**kwargs: Any) -> int:
    """A PolicyContext sizer under which every policy fits."""
    return 0


def ed25519_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class _Helpers:
    """Shared helpers; mixed into SynchronousTestCase classes below."""

    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write(self, folder: str, name: str, content: bytes | str) -> str:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as f:
            f.write(content)
        return path

    def problems(
        self,
        data: dict,
        *,
        check_files: bool = False,
        base_dir: Optional[str] = None,
        token_size: Callable[..., int] = no_size,
    ) -> list[str]:
        """The problems ``data`` raises (fails the test when it is valid)."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(
                data,
                base_dir or self.folder(),
                check_files=check_files,
                token_size=token_size,
            )
        return caught.exception.problems

    def assertProblem(self, data: dict, path: str, fragment: str = "", **kwargs: Any) -> list[str]:
        """``data`` is refused with a problem at exactly ``path`` mentioning ``fragment``."""
        problems = self.problems(data, **kwargs)
        matching = [p for p in problems if p.startswith(path + ": ") and fragment in p]
        self.assertTrue(
            matching,
            f"no problem at {path!r} containing {fragment!r} in {problems!r}",
        )
        return problems

    def valid(self, data: dict, **kwargs: Any):
        kwargs.setdefault("check_files", False)
        kwargs.setdefault("token_size", no_size)
        return parse_config(data, kwargs.pop("base_dir", None) or self.folder(), **kwargs)


class ParseDurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        """Each unit converts to seconds, fractions included."""
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("5s"), 5.0)
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertEqual(parse_duration("2m"), 120.0)
        self.assertEqual(parse_duration("1h"), 3600.0)
        self.assertEqual(parse_duration("0s"), 0.0)

    def test_refused(self) -> None:
        """Bare numbers, negative values, unknown units and stray spaces are refused."""
        for bad in (30, 1.5, "30", "-1s", "5 s", " 5s", "1.s", ".5s", "5sec", "5S", "", "1d", "nan s"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                parse_duration(bad)  # type: ignore[arg-type]


class ValidConfigTests(_Helpers, SynchronousTestCase):
    def test_minimal_file_and_defaults(self) -> None:
        """
        The smallest valid file loads with files checked, and every key left
        out takes the default SPEC §3 and the model give it.
        """
        folder = self.folder()
        self.write(folder, "keys/policy.pem", ed25519_pem())
        path = self.write(folder, "shardtcp.toml", MINIMAL_TOML)
        config = load_config(path)

        self.assertEqual(config.path, path)
        self.assertEqual(config.proxy.id, "edge-1")
        self.assertIsNone(config.proxy.location)
        self.assertEqual(config.signing.private_key, os.path.join(folder, "keys", "policy.pem"))
        self.assertEqual(config.signing.kid, "policy-1")
        self.assertEqual(config.signing.ttl, 30.0)
        self.assertEqual(config.signing.tlv_type, 0xE0)

        [listener] = config.listeners
        self.assertEqual(listener.name, "edge")
        self.assertEqual(listener.listen, "tcp:0:interface=127.0.0.1")
        self.assertEqual(listener.mode, "passthrough")
        self.assertEqual(listener.identify, ("sni",))
        self.assertIsNone(listener.default_service)
        self.assertEqual(listener.peek_timeout, 5.0)
        self.assertEqual(listener.max_client_hello, 16384)
        self.assertFalse(listener.accept_proxy)
        self.assertEqual(listener.trusted_proxies, ())
        self.assertEqual(listener.idle_timeout, 0.0)
        self.assertEqual(listener.connect_timeout, 5.0)
        self.assertEqual(listener.retries, 2)
        self.assertEqual(listener.certificates, ())

        [service] = config.services
        self.assertEqual(service.id, "api")
        self.assertEqual(service.names, ("api.example.test",))
        self.assertFalse(service.upstream_tls)
        self.assertEqual(service.weights, Weights(latency=0.5, security=0.3, load=0.2))
        self.assertEqual(service.policy, PolicyConfig())
        self.assertEqual(
            service.policy.allow,
            (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
        )
        [shard] = service.shards
        self.assertEqual(shard.id, "api-1")
        self.assertEqual(shard.address, Address("127.0.0.1", 9001))
        self.assertEqual(shard.weight, 1.0)
        self.assertEqual(shard.capacity, 1000)
        self.assertEqual(shard.security_score, 100.0)
        self.assertIsNone(shard.health_check)

        self.assertEqual(config.geo, ())
        self.assertIsNone(config.threat_intel)
        self.assertIsNone(config.admin)
        self.assertEqual(config.registry, RegistryConfig(kind="static"))
        self.assertEqual(check_config(path), [])

    def test_example_file(self) -> None:
        """
        etc/shardtcp.toml, the commented example of every key, is valid when
        the files it names are not looked at.
        """
        config = load_config(EXAMPLE, check_files=False)
        self.assertEqual(config.proxy.id, "edge-fra-1")
        self.assertEqual([l.mode for l in config.listeners], ["passthrough", "terminate", "plain"])
        self.assertEqual([s.id for s in config.services], ["api", "web"])
        self.assertIsNotNone(config.threat_intel)
        self.assertIsNotNone(config.admin)
        self.assertTrue(config.geo)

    def test_full_values(self) -> None:
        """Given values land in the model converted: durations, networks, locations, checks."""
        data = minimal()
        data["proxy"]["location"] = {"lat": 50.11, "lon": 8, "region": "eu-central"}
        data["signing"].update(ttl="1m", tlv_type=0xEF)
        data["listener"][0].update(
            identify=["connect", "sni"],
            peek_timeout="250ms",
            accept_proxy=True,
            trusted_proxies=["10.0.0.0/8"],
            idle_timeout="1h",
            retries=0,
            max_client_hello=512,
        )
        service = data["service"]["api"]
        service["weights"] = {"latency": 1}
        service["policy"] = {
            "encryption": "mtls",
            "authentication": "mtls",
            "acl": ["a:read"],
            "allow": ["10.0.0.0/8"],
            "deny": ["10.1.0.0/16"],
            "min_security_score": 50,
            "regions": ["eu-*"],
        }
        service["shard"][0].update(
            address="[2001:db8::1]:443",
            location={"lat": -33.9, "lon": 151.2},
            capacity=5,
            security_score=70,
            weight=0.5,
            server_name="Shard.Example.test",
            health_check={"kind": "agent", "agent_port": 9101, "interval": "5s", "rise": 1},
            slow_start="0s",
        )
        data["geo"] = {"networks": [{"cidr": "198.51.100.0/24", "lat": 1, "lon": 2}]}
        config = self.valid(data)

        self.assertEqual(config.proxy.location, Location(50.11, 8.0, "eu-central"))
        self.assertEqual((config.signing.ttl, config.signing.tlv_type), (60.0, 0xEF))
        listener = config.listeners[0]
        self.assertEqual(listener.identify, ("connect", "sni"))
        self.assertEqual(listener.peek_timeout, 0.25)
        self.assertEqual(listener.trusted_proxies, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(listener.idle_timeout, 3600.0)
        self.assertEqual((listener.retries, listener.max_client_hello), (0, 512))
        service_config = config.services[0]
        self.assertEqual(service_config.weights, Weights(latency=1.0, security=0.3, load=0.2))
        policy = service_config.policy
        self.assertEqual((policy.encryption, policy.authentication), ("mtls", "mtls"))
        self.assertEqual(policy.acl, ("a:read",))
        self.assertEqual(policy.allow, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(policy.deny, (ipaddress.ip_network("10.1.0.0/16"),))
        self.assertEqual((policy.min_security_score, policy.regions), (50.0, ("eu-*",)))
        shard = service_config.shards[0]
        self.assertEqual(shard.address, Address("2001:db8::1", 443))
        self.assertEqual(str(shard.address), "[2001:db8::1]:443")
        self.assertEqual(shard.location, Location(-33.9, 151.2, ""))
        self.assertEqual((shard.capacity, shard.security_score, shard.weight), (5, 70.0, 0.5))
        self.assertEqual(shard.server_name, "shard.example.test")
        self.assertEqual(
            shard.health_check,
            HealthCheckConfig(kind="agent", interval=5.0, timeout=1.0, rise=1, fall=3, agent_port=9101),
        )
        self.assertEqual(shard.slow_start, 0.0)
        [network] = config.geo
        self.assertEqual(network.network, ipaddress.ip_network("198.51.100.0/24"))
        self.assertEqual(network.location, Location(1.0, 2.0, ""))

    def test_endpoint_kinds(self) -> None:
        """tcp6, unix and systemd endpoint strings are accepted, systemd ones without inherited sockets."""
        for listen in (
            "tcp6:0:interface=\\:\\:1",
            "unix:/nonexistent/shardtcp.sock",
            "systemd:domain=INET:index=0",
            "tcp:port=8443",
        ):
            data = minimal()
            data["listener"][0]["listen"] = listen
            self.assertEqual(self.valid(data).listeners[0].listen, listen)

    def test_names_lowercased(self) -> None:
        """Service and certificate names are stored lowercase, trailing dot dropped."""
        data = minimal()
        data["service"]["api"]["names"] = ["API.Example.TEST.", "*.Api.Example.test:8443"]
        config = self.valid(data)
        self.assertEqual(config.services[0].names, ("api.example.test", "*.api.example.test:8443"))

    def test_files_not_opened_without_check_files(self) -> None:
        """With check_files=False, missing key, certificate and token files are no problem."""
        data = minimal()
        data["listener"][0].update(
            mode="terminate",
            certificates=[{"cert": "nope.pem", "key": "nope.key", "names": ["a.test"]}],
            client_ca="nope-ca.pem",
        )
        data["admin"] = {"listen": "tcp:0", "token_file": "nope.token"}
        data["threat_intel"] = {"trusted_keys": "nope.json"}
        self.valid(data)


class PathTests(_Helpers, SynchronousTestCase):
    def test_relative_paths(self) -> None:
        """
        Relative paths resolve against the configuration file's folder, not
        the working directory; absolute paths and feed URLs are kept.
        """
        root = self.folder()
        folder = os.path.join(root, "conf")
        other = os.path.join(root, "elsewhere")
        os.makedirs(other)
        key = self.write(root, "shared/policy.pem", ed25519_pem())
        self.write(folder, "certs/api.pem", "cert")
        self.write(folder, "certs/api.key", "key")
        self.write(folder, "jwks.json", "{}")
        text = MINIMAL_TOML.replace('"keys/policy.pem"', '"../shared/policy.pem"') + """
[threat_intel]
trusted_keys = "jwks.json"
feeds = [ { source = "feeds/a.jws" }, { source = "https://intel.test/f.jws" }, { source = "/abs/b.jws" } ]
state_file = "state.json"
"""
        text = text.replace(
            'listen = "tcp:0:interface=127.0.0.1"',
            'listen = "tcp:0:interface=127.0.0.1"\nmode = "terminate"\n'
            'certificates = [ { cert = "certs/api.pem", key = "./certs/api.key" } ]',
        )
        path = self.write(folder, "shardtcp.toml", text)
        cwd = os.getcwd()
        os.chdir(other)
        self.addCleanup(os.chdir, cwd)
        config = load_config(os.path.relpath(path))

        self.assertEqual(config.path, path)
        self.assertEqual(config.signing.private_key, key)
        [certificate] = config.listeners[0].certificates
        self.assertEqual(certificate.cert, os.path.join(folder, "certs", "api.pem"))
        self.assertEqual(certificate.key, os.path.join(folder, "certs", "api.key"))
        intel = config.threat_intel
        self.assertEqual(intel.trusted_keys, os.path.join(folder, "jwks.json"))
        self.assertEqual(
            [f.source for f in intel.feeds],
            [os.path.join(folder, "feeds", "a.jws"), "https://intel.test/f.jws", "/abs/b.jws"],
        )
        self.assertEqual(intel.state_file, os.path.join(folder, "state.json"))

    def test_check_files(self) -> None:
        """With check_files, every file read at start-up must exist; each missing one is named."""
        folder = self.folder()
        data = minimal()
        data["listener"][0].update(
            mode="terminate",
            certificates=[{"cert": "c.pem", "key": "c.key"}],
            default_certificate={"cert": "d.pem", "key": "d.key"},
            client_ca="ca.pem",
        )
        data["service"]["api"].update(upstream_tls=True, upstream_ca="sca.pem")
        data["threat_intel"] = {"trusted_keys": "jwks.json", "state_file": "no/such/dir/s.json"}
        data["admin"] = {"listen": "tcp:0", "token_file": "admin.token"}
        problems = self.problems(data, check_files=True, base_dir=folder)
        for path in (
            "signing.private_key",
            "listener[0].certificates[0].cert",
            "listener[0].certificates[0].key",
            "listener[0].default_certificate.cert",
            "listener[0].default_certificate.key",
            "listener[0].client_ca",
            "service.api.upstream_ca",
            "threat_intel.trusted_keys",
            "threat_intel.state_file",
            "admin.token_file",
        ):
            self.assertTrue(
                [p for p in problems if p.startswith(path + ": ")],
                f"{path} not in {problems!r}",
            )
        self.assertIn(
            f"admin.token_file: cannot read {os.path.join(folder, 'admin.token')}: "
            "No such file or directory",
            problems,
        )


class SigningKeyTests(_Helpers, SynchronousTestCase):
    def key_problems(self, pem: bytes) -> list[str]:
        folder = self.folder()
        self.write(folder, "keys/policy.pem", pem)
        return self.problems(minimal(), check_files=True, base_dir=folder)

    def test_not_pem(self) -> None:
        """A file that is not a PEM private key is refused at signing.private_key."""
        [problem] = self.key_problems(b"hello")
        self.assertTrue(problem.startswith("signing.private_key: "), problem)
        self.assertIn("not a PEM private key", problem)

    def test_not_ed25519(self) -> None:
        """A PEM key of another algorithm (P-256 here) is refused."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        [problem] = self.key_problems(pem)
        self.assertTrue(problem.startswith("signing.private_key: "), problem)
        self.assertIn("not an Ed25519 key", problem)

    def test_encrypted(self) -> None:
        """A password-protected key is refused: the daemon could not unlock it."""
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        [problem] = self.key_problems(pem)
        self.assertTrue(problem.startswith("signing.private_key: "), problem)
        self.assertIn("encrypted", problem)

    def test_missing(self) -> None:
        """A key file that does not exist is named with its absolute path."""
        folder = self.folder()
        problems = self.problems(minimal(), check_files=True, base_dir=folder)
        self.assertEqual(
            problems,
            [
                "signing.private_key: cannot read "
                f"{os.path.join(folder, 'keys', 'policy.pem')}: No such file or directory"
            ],
        )


class KeyAndTypeTests(_Helpers, SynchronousTestCase):
    def test_unknown_key_suggests(self) -> None:
        """An unknown key is named by its path, with the closest known key suggested."""
        data = minimal()
        data["listener"][0]["idnetify"] = ["sni"]
        problems = self.problems(data)
        self.assertEqual(problems, ["listener[0].idnetify: unknown key; did you mean 'identify'?"])

    def test_unknown_keys_everywhere(self) -> None:
        """Unknown keys are caught at every level: top, service, policy, shard, nested tables."""
        data = minimal()
        data["listeners"] = []
        data["proxy"]["location"] = {"lat": 1, "lon": 2, "regoin": "x"}
        data["service"]["api"]["nmaes"] = []
        data["service"]["api"]["policy"] = {"alow": []}
        data["service"]["api"]["shard"][0]["health_check"] = {"kind": "tcp", "intervl": "1s"}
        data["service"]["api"]["shard"][0]["zzz"] = 1
        problems = self.problems(data)
        self.assertIn("listeners: unknown key; did you mean 'listener'?", problems)
        self.assertIn("proxy.location.regoin: unknown key; did you mean 'region'?", problems)
        self.assertIn("service.api.nmaes: unknown key; did you mean 'names'?", problems)
        self.assertIn("service.api.policy.alow: unknown key; did you mean 'allow'?", problems)
        self.assertIn(
            "service.api.shard[0].health_check.intervl: unknown key; did you mean 'interval'?",
            problems,
        )
        self.assertIn("service.api.shard[0].zzz: unknown key", problems)

    def test_duration_type(self) -> None:
        """A bare number where a duration belongs is refused with a hint of the right form."""
        data = minimal()
        data["signing"]["ttl"] = 30
        self.assertEqual(
            self.problems(data), ['signing.ttl: expected a duration string like "30s", got 30']
        )

    def test_wrong_types(self) -> None:
        """Strings, integers, booleans, lists and tables of the wrong type are each named."""
        data = minimal()
        data["proxy"]["id"] = 5
        data["listener"][0].update(retries="2", accept_proxy="yes", max_client_hello=True)
        data["listener"][0]["identify"] = "sni"
        data["service"]["api"]["shard"][0]["capacity"] = 1.5
        data["service"]["api"]["weights"] = "heavy"
        problems = self.problems(data)
        for expected in (
            "proxy.id: expected a string, got 5",
            "listener[0].retries: expected an integer, got '2'",
            "listener[0].accept_proxy: expected true or false, got 'yes'",
            "listener[0].max_client_hello: expected an integer, got True",
            "listener[0].identify: expected a list of strings, got 'sni'",
            "service.api.shard[0].capacity: expected an integer, got 1.5",
            "service.api.weights: expected a table, got 'heavy'",
        ):
            self.assertIn(expected, problems)

    def test_listener_must_be_array(self) -> None:
        """A single [listener] table instead of [[listener]] is refused."""
        data = minimal()
        data["listener"] = data["listener"][0]
        self.assertProblem(data, "listener", "expected an array of tables")

    def test_several_problems_at_once(self) -> None:
        """Every problem is reported, not only the first, across sections."""
        data = minimal()
        data["proxy"]["id"] = ""
        data["signing"]["tlv_type"] = 0x01
        data["listener"][0]["retries"] = 11
        data["service"]["api"]["shard"][0]["address"] = "x"
        data["admin"] = {"listen": "bogus:1"}
        problems = self.problems(data)
        self.assertEqual(len(problems), 5, problems)
        self.assertEqual(
            [p.split(":")[0] for p in problems],
            [
                "proxy.id",
                "signing.tlv_type",
                "service.api.shard[0].address",
                "listener[0].retries",
                "admin.listen",
            ],
        )


class ProxyAndSigningTests(_Helpers, SynchronousTestCase):
    def test_proxy_id_required(self) -> None:
        """proxy.id must be present and non-empty; [proxy] and [signing] themselves are required."""
        data = minimal()
        del data["proxy"]["id"]
        self.assertEqual(self.problems(data), ["proxy.id: required"])
        data["proxy"]["id"] = ""
        self.assertEqual(self.problems(data), ["proxy.id: must not be empty"])
        data = minimal()
        del data["proxy"], data["signing"]
        problems = self.problems(data)
        self.assertEqual([p.split(":")[0] for p in problems], ["proxy", "signing"])

    def test_location_ranges(self) -> None:
        """Latitude outside -90..90 and longitude outside -180..180 are refused."""
        data = minimal()
        data["proxy"]["location"] = {"lat": 91, "lon": 0}
        self.assertProblem(data, "proxy.location.lat", "between -90 and 90")
        data["proxy"]["location"] = {"lat": 0, "lon": -180.5}
        self.assertProblem(data, "proxy.location.lon", "between -180 and 180")
        data["proxy"]["location"] = {"lon": 0}
        self.assertProblem(data, "proxy.location.lat", "required")

    def test_tlv_type_range(self) -> None:
        """signing.tlv_type must be one of the custom types 0xE0..0xEF."""
        for bad in (0xDF, 0xF0, 0x20):
            data = minimal()
            data["signing"]["tlv_type"] = bad
            self.assertProblem(data, "signing.tlv_type", "0xE0..0xEF")
        data = minimal()
        data["signing"]["tlv_type"] = 0xE5
        self.assertEqual(self.valid(data).signing.tlv_type, 0xE5)

    def test_ttl_range(self) -> None:
        """signing.ttl must be more than 0 and at most a day."""
        data = minimal()
        data["signing"]["ttl"] = "0s"
        self.assertProblem(data, "signing.ttl", "longer than 0s")
        data["signing"]["ttl"] = "25h"
        self.assertProblem(data, "signing.ttl", "at most 86400s")
        data["signing"]["ttl"] = "24h"
        self.assertEqual(self.valid(data).signing.ttl, 86400.0)

    def test_kid_and_key_required(self) -> None:
        """signing.kid and signing.private_key are required."""
        data = minimal()
        del data["signing"]["kid"], data["signing"]["private_key"]
        self.assertEqual(
            sorted(self.problems(data)),
            ["signing.kid: required", "signing.private_key: required"],
        )


class ListenerTests(_Helpers, SynchronousTestCase):
    def listener(self, **values: Any) -> dict:
        data = minimal()
        data["listener"][0].update(values)
        return data

    def test_names_unique_and_required(self) -> None:
        """Two listeners may not share a name, and each needs one."""
        data = minimal()
        data["listener"].append({"name": "edge", "listen": "tcp:0"})
        data["listener"].append({"listen": "tcp:0"})
        problems = self.problems(data)
        self.assertIn("listener[1].name: 'edge' is already the name of listener[0]", problems)
        self.assertIn("listener[2].name: required", problems)

    def test_mode(self) -> None:
        """mode must be passthrough, terminate or plain."""
        self.assertProblem(self.listener(mode="tls"), "listener[0].mode", '"passthrough", "terminate" or "plain"')

    def test_identify_values(self) -> None:
        """Unknown and repeated identify methods are refused, each at its index."""
        problems = self.problems(self.listener(identify=["sni", "snl", "sni"]))
        self.assertIn(
            "listener[0].identify[1]: expected one of \"sni\", \"connect\", \"line\" or \"http-host\", got 'snl'",
            problems,
        )
        self.assertIn("listener[0].identify[2]: 'sni' is listed twice", problems)

    def test_plain_identify(self) -> None:
        """A plain listener must list its identify methods and may not use sni."""
        self.assertProblem(self.listener(mode="plain"), "listener[0].identify", "required on plain listeners")
        self.assertProblem(
            self.listener(mode="plain", identify=["line", "sni"]), "listener[0].identify[1]", "not possible on plain"
        )
        config = self.valid(self.listener(mode="plain", identify=["http-host"]))
        self.assertEqual(config.listeners[0].identify, ("http-host",))

    def test_empty_identify(self) -> None:
        """An empty identify list is only allowed with a default_service to fall back on."""
        self.assertProblem(self.listener(identify=[]), "listener[0].identify", "default_service")
        config = self.valid(self.listener(identify=[], default_service="api"))
        self.assertEqual(config.listeners[0].identify, ())

    def test_listen(self) -> None:
        """listen must be a Twisted server endpoint string, with a port that exists."""
        for bad in ("tcp:abc", "bogus:1", "tcp:1:bogus=1", "tcp:70000", "tcp", "", "systemd:domain=INET"):
            self.assertProblem(self.listener(listen=bad), "listener[0].listen")
        data = minimal()
        del data["listener"][0]["listen"]
        self.assertProblem(data, "listener[0].listen", "required")

    def test_admin_listen(self) -> None:
        """admin.listen is checked the same way and is required in [admin]."""
        data = minimal()
        data["admin"] = {"listen": "tcp:http"}
        self.assertProblem(data, "admin.listen", "not a Twisted server endpoint description")
        data["admin"] = {}
        self.assertProblem(data, "admin.listen", "required")

    def test_default_service(self) -> None:
        """default_service must name a configured service."""
        self.assertEqual(
            self.problems(self.listener(default_service="apj")),
            ["listener[0].default_service: no service 'apj'; did you mean 'api'?"],
        )
        self.assertEqual(self.valid(self.listener(default_service="api")).listeners[0].default_service, "api")

    def test_terminate_needs_certificate(self) -> None:
        """A terminate listener without certificates or default_certificate is refused."""
        self.assertProblem(self.listener(mode="terminate"), "listener[0].certificates", "needs certificates")
        self.assertProblem(
            self.listener(mode="terminate", certificates=[]), "listener[0].certificates", "needs certificates"
        )
        folder = self.folder()
        config = self.valid(
            self.listener(mode="terminate", default_certificate={"cert": "a.pem", "key": "a.key"}),
            base_dir=folder,
        )
        default = config.listeners[0].default_certificate
        self.assertEqual((default.cert, default.key), (os.path.join(folder, "a.pem"), os.path.join(folder, "a.key")))

    def test_certificate_entries(self) -> None:
        """Certificate entries need cert and key, and their names must be DNS names."""
        problems = self.problems(
            self.listener(mode="terminate", certificates=[{"names": ["ok.test", "bad name"]}])
        )
        self.assertIn("listener[0].certificates[0].cert: required", problems)
        self.assertIn("listener[0].certificates[0].key: required", problems)
        self.assertIn(
            "listener[0].certificates[0].names[1]: 'bad name' is not a DNS name or *.wildcard", problems
        )

    def test_terminate_only_keys(self) -> None:
        """TLS-termination keys on a passthrough listener are refused, each by name."""
        problems = self.problems(
            self.listener(
                certificates=[{"cert": "a", "key": "b"}],
                default_certificate={"cert": "a", "key": "b"},
                client_ca="ca.pem",
                alpn=["h2"],
            )
        )
        for key in ("certificates", "default_certificate", "client_ca", "alpn"):
            self.assertIn(
                f"listener[0].{key}: only on mode = \"terminate\" listeners (this one is 'passthrough')",
                problems,
            )

    def test_require_client_cert_needs_ca(self) -> None:
        """require_client_cert without client_ca is refused."""
        self.assertProblem(
            self.listener(mode="terminate", default_certificate={"cert": "a", "key": "b"}, require_client_cert=True),
            "listener[0].client_ca",
            "required with require_client_cert",
        )

    def test_trusted_proxies(self) -> None:
        """trusted_proxies is required with accept_proxy and refused without it."""
        self.assertProblem(self.listener(accept_proxy=True), "listener[0].trusted_proxies", "required with accept_proxy")
        self.assertProblem(
            self.listener(trusted_proxies=["10.0.0.0/8"]), "listener[0].trusted_proxies", "only with accept_proxy"
        )
        self.assertProblem(
            self.listener(accept_proxy=True, trusted_proxies=["10.0.0.1/8"]),
            "listener[0].trusted_proxies[0]",
            "host bits set",
        )

    def test_ranges(self) -> None:
        """retries 0..10, max_client_hello 512..65536, durations never negative."""
        self.assertProblem(self.listener(retries=11), "listener[0].retries", "between 0 and 10")
        self.assertProblem(self.listener(retries=-1), "listener[0].retries", "between 0 and 10")
        self.assertProblem(self.listener(max_client_hello=511), "listener[0].max_client_hello", "between 512 and 65536")
        self.assertProblem(self.listener(max_client_hello=65537), "listener[0].max_client_hello", "between 512 and 65536")
        for key in ("peek_timeout", "idle_timeout", "connect_timeout"):
            self.assertProblem(self.listener(**{key: "-1s"}), f"listener[0].{key}", "expected a duration")

    def test_alpn_and_min_tls(self) -> None:
        """ALPN names must be 1..255 bytes; min_tls is "1.2" or "1.3"."""
        terminate = {"mode": "terminate", "default_certificate": {"cert": "a", "key": "b"}}
        self.assertProblem(self.listener(alpn=["h2", "x" * 256], **terminate), "listener[0].alpn[1]", "255 bytes")
        self.assertProblem(self.listener(alpn=[""], **terminate), "listener[0].alpn[0]", "must not be empty")
        self.assertProblem(self.listener(min_tls="1.1", **terminate), "listener[0].min_tls", '"1.2" or "1.3"')
        self.assertProblem(self.listener(min_tls=1.3, **terminate), "listener[0].min_tls", '"1.2" or "1.3"')
        config = self.valid(self.listener(alpn=["h2", "x" * 255], min_tls="1.3", **terminate))
        self.assertEqual(config.listeners[0].min_tls, "1.3")


class ServiceTests(_Helpers, SynchronousTestCase):
    def test_service_id(self) -> None:
        """Service ids may only use letters, digits, '_', '.' and '-'."""
        data = minimal()
        data["service"]["a pi"] = data["service"].pop("api")
        self.assertProblem(data, 'service."a pi"', "may only use")

    def test_names(self) -> None:
        """Invalid service names are refused at their index."""
        data = minimal()
        data["service"]["api"]["names"] = ["ok.test", "*", "a..b", "-a.test", "a.test:0", "a.*.test", "ünï.test"]
        problems = self.problems(data)
        self.assertEqual(
            [p.split(":")[0] for p in problems],
            [f"service.api.names[{i}]" for i in range(1, 7)],
        )

    def test_name_in_two_services(self) -> None:
        """A name listed by two services is refused, naming both services."""
        data = minimal()
        data["service"]["web"] = {
            "names": ["www.test", "API.example.test"],
            "shard": [{"id": "web-1", "address": "127.0.0.1:80"}],
        }
        self.assertEqual(
            self.problems(data),
            ["service.web.names[1]: 'api.example.test' is a name of both service 'api' and service 'web'"],
        )

    def test_weights(self) -> None:
        """Weights must be non-negative numbers with a positive sum."""
        data = minimal()
        data["service"]["api"]["weights"] = {"latency": -1}
        self.assertProblem(data, "service.api.weights.latency", "at least 0")
        data["service"]["api"]["weights"] = {"latency": 0, "security": 0, "load": 0}
        self.assertProblem(data, "service.api.weights", "more than 0")

    def test_policy(self) -> None:
        """Every policy key is checked and named by its path."""
        data = minimal()
        data["service"]["api"]["policy"] = {
            "encryption": "ssl",
            "authentication": "password",
            "acl": ["ok", 3],
            "allow": ["10.0.0.1/8"],
            "deny": ["nonsense"],
            "min_security_score": 101,
            "regions": [1],
        }
        problems = self.problems(data)
        self.assertIn(
            "service.api.policy.encryption: expected one of \"none\", \"tls\" or \"mtls\", got 'ssl'",
            problems,
        )
        self.assertIn(
            "service.api.policy.authentication: expected one of \"none\" or \"mtls\", got 'password'",
            problems,
        )
        self.assertIn("service.api.policy.acl[1]: expected a string, got 3", problems)
        self.assertIn(
            "service.api.policy.allow[0]: not a valid network '10.0.0.1/8': 10.0.0.1/8 has host bits set",
            problems,
        )
        self.assertTrue([p for p in problems if p.startswith("service.api.policy.deny[0]: ")], problems)
        self.assertIn("service.api.policy.min_security_score: must be between 0 and 100, got 101", problems)
        self.assertIn("service.api.policy.regions[0]: expected a string, got 1", problems)
        self.assertEqual(len(problems), 7, problems)

    def test_upstream_keys(self) -> None:
        """upstream_ca/cert/key need upstream_tls, and cert and key go together."""
        data = minimal()
        data["service"]["api"]["upstream_ca"] = "ca.pem"
        self.assertProblem(data, "service.api.upstream_ca", "only with upstream_tls = true")
        data["service"]["api"].update(upstream_tls=True, upstream_cert="c.pem")
        # Only a terminating listener may route to an upstream_tls service.
        data["listener"][0].update(mode="terminate", default_certificate={"cert": "c.pem", "key": "k.pem"})
        self.assertEqual(self.problems(data), ["service.api.upstream_key: required with upstream_cert"])

    def test_static_registry_needs_shards(self) -> None:
        """With the static registry a service needs a shard; with etcd it does not."""
        data = minimal()
        del data["service"]["api"]["shard"]
        self.assertProblem(data, "service.api.shard", "at least one")
        data["registry"] = {"kind": "etcd", "endpoints": ["https://etcd.test:2379"], "prefix": "/x/"}
        # The registry supplies the shards: none is asked for in the file.
        config = self.valid(data)
        self.assertEqual(config.services[0].shards, ())
        self.assertEqual(
            config.registry,
            RegistryConfig(kind="etcd", endpoints=("https://etcd.test:2379",), prefix="/x/"),
        )

    def test_registry_snapshot_and_lease(self) -> None:
        """registry.snapshot is relative to the file's folder; lease_ttl is 2s..1h, both edges."""
        data = minimal()
        data["registry"] = {"kind": "etcd", "snapshot": "state/registry.json", "lease_ttl": "2s"}
        config = self.valid(data, base_dir="/etc/shardtcp")
        self.assertEqual(config.registry.snapshot, "/etc/shardtcp/state/registry.json")
        self.assertEqual(config.registry.lease_ttl, 2.0)
        data["registry"]["lease_ttl"] = "1h"
        self.assertEqual(self.valid(data).registry.lease_ttl, 3600.0)
        data["registry"]["lease_ttl"] = "1999ms"
        self.assertProblem(data, "registry.lease_ttl", "between 2s and 1h")
        data["registry"]["lease_ttl"] = "3601s"
        self.assertProblem(data, "registry.lease_ttl", "between 2s and 1h")
        data["registry"] = {"kind": "etcd", "prefix": "shardtcp"}
        self.assertProblem(data, "registry.prefix", "must start with '/'")
        data["registry"] = {"kind": "static", "snapshot": "x.json"}
        self.assertProblem(data, "registry.snapshot", 'only with kind = "etcd"')

    def test_registry(self) -> None:
        """registry.kind is static or etcd; etcd keys are refused with static."""
        data = minimal()
        data["registry"] = {"kind": "consul"}
        self.assertProblem(data, "registry.kind", '"static" or "etcd"')
        data["registry"] = {"kind": "static", "endpoints": []}
        self.assertProblem(data, "registry.endpoints", 'only with kind = "etcd"')
        data["registry"] = {"kind": "etcd", "endpoints": ["etcd:2379"]}
        self.assertProblem(data, "registry.endpoints[0]", "http(s)")


class ShardTests(_Helpers, SynchronousTestCase):
    def shard(self, **values: Any) -> dict:
        data = minimal()
        data["service"]["api"]["shard"].append({"id": "api-2", "address": "127.0.0.1:9002"})
        data["service"]["api"]["shard"].append({"id": "api-3", "address": "127.0.0.1:9003", **values})
        return data

    def test_id(self) -> None:
        """A shard id is required and uses the service-id alphabet."""
        data = self.shard()
        del data["service"]["api"]["shard"][2]["id"]
        self.assertEqual(self.problems(data), ["service.api.shard[2].id: required"])
        self.assertProblem(self.shard(id="a/b"), "service.api.shard[2].id", "may only use")

    def test_duplicate_ids_across_services(self) -> None:
        """A shard id used in two services is refused: ids are unique in the whole file."""
        data = minimal()
        data["service"]["web"] = {"names": ["www.test"], "shard": [{"id": "api-1", "address": "h:1"}]}
        [problem] = self.problems(data)
        self.assertTrue(
            problem.startswith(
                "service.web.shard[0].id: shard id 'api-1' is already used in service.api.shard[0]"
            ),
            problem,
        )

    def test_address(self) -> None:
        """Addresses are host:port or [v6]:port with a port in 1..65535."""
        self.assertEqual(
            self.problems(self.shard(address="x")),
            ["service.api.shard[2].address: expected host:port or [ipv6]:port, got 'x'"],
        )
        for bad in ("::1:80", "[::1]80", "[nothost]:80", "h:0", "h:65536", "h:", ":80", "a b:80", "[::1]:"):
            self.assertProblem(self.shard(address=bad), "service.api.shard[2].address")
        for good, expected in (
            ("[::1]:80", Address("::1", 80)),
            ("db_1.internal:65535", Address("db_1.internal", 65535)),
            ("10.0.0.1:1", Address("10.0.0.1", 1)),
        ):
            self.assertEqual(self.valid(self.shard(address=good)).services[0].shards[2].address, expected)

    def test_numbers(self) -> None:
        """capacity >= 1, security_score 0..100, weight > 0."""
        self.assertProblem(self.shard(capacity=0), "service.api.shard[2].capacity", "at least 1")
        self.assertProblem(self.shard(security_score=-1), "service.api.shard[2].security_score", "between 0 and 100")
        self.assertProblem(self.shard(security_score=100.5), "service.api.shard[2].security_score", "between 0 and 100")
        self.assertProblem(self.shard(weight=0), "service.api.shard[2].weight", "greater than 0")
        self.assertProblem(self.shard(weight=float("nan")), "service.api.shard[2].weight", "finite")

    def test_health_check(self) -> None:
        """Health checks: kind, positive durations, rise/fall >= 1, agent_port for agent only."""
        path = "service.api.shard[2].health_check"
        self.assertProblem(self.shard(health_check={"kind": "icmp"}), f"{path}.kind", '"tcp", "tls" or "agent"')
        self.assertProblem(self.shard(health_check={}), f"{path}.kind", "required")
        self.assertProblem(self.shard(health_check={"kind": "tcp", "interval": "0s"}), f"{path}.interval", "longer than 0s")
        self.assertProblem(self.shard(health_check={"kind": "tcp", "timeout": 1}), f"{path}.timeout", "duration")
        self.assertProblem(self.shard(health_check={"kind": "tcp", "rise": 0}), f"{path}.rise", "at least 1")
        self.assertProblem(self.shard(health_check={"kind": "tcp", "fall": 1.0}), f"{path}.fall", "integer")
        self.assertProblem(self.shard(health_check={"kind": "agent"}), f"{path}.agent_port", "required")
        self.assertProblem(self.shard(health_check={"kind": "tcp", "agent_port": 1}), f"{path}.agent_port", "only with")
        self.assertProblem(
            self.shard(health_check={"kind": "agent", "agent_port": 0}), f"{path}.agent_port", "between 1 and 65535"
        )

    def test_slow_start_and_server_name(self) -> None:
        """slow_start must be a duration; server_name a DNS name, not a wildcard."""
        self.assertProblem(self.shard(slow_start="soon"), "service.api.shard[2].slow_start", "duration")
        self.assertProblem(self.shard(server_name="*.a.test"), "service.api.shard[2].server_name", "wildcard")
        self.assertProblem(self.shard(server_name="a b"), "service.api.shard[2].server_name", "DNS name")


class GeoThreatAdminTests(_Helpers, SynchronousTestCase):
    def test_geo(self) -> None:
        """geo networks need a strict CIDR and a valid lat/lon."""
        data = minimal()
        data["geo"] = {
            "networks": [
                {"cidr": "10.0.0.1/8", "lat": 0, "lon": 0},
                {"lat": 0, "lon": 0},
                {"cidr": "10.0.0.0/8", "lat": 100, "lon": 0, "region": 5},
            ]
        }
        problems = self.problems(data)
        self.assertIn("geo.networks[0].cidr: not a valid network '10.0.0.1/8': 10.0.0.1/8 has host bits set", problems)
        self.assertIn("geo.networks[1].cidr: required", problems)
        self.assertIn("geo.networks[2].lat: must be between -90 and 90, got 100", problems)
        self.assertIn("geo.networks[2].region: expected a string, got 5", problems)

    def test_threat_intel(self) -> None:
        """threat_intel: trusted_keys required, feeds need a source and positive refresh, on_expiry checked."""
        data = minimal()
        data["threat_intel"] = {
            "feeds": [{"refresh": "1m"}, {"source": "f.jws", "refresh": "0s"}, {"source": "https://"}],
            "on_expiry": "ignore",
        }
        problems = self.problems(data)
        self.assertIn("threat_intel.trusted_keys: required", problems)
        self.assertIn("threat_intel.feeds[0].source: required", problems)
        self.assertIn("threat_intel.feeds[1].refresh: must be longer than 0s, got '0s'", problems)
        self.assertIn("threat_intel.feeds[2].source: not a valid URL: 'https://'", problems)
        self.assertIn(
            "threat_intel.on_expiry: expected one of \"baseline\" or \"distrust\", got 'ignore'", problems
        )


class TokenSizeTests(_Helpers, SynchronousTestCase):
    def test_over_limit(self) -> None:
        """A (service, shard) whose PolicyContext could pass 1024 bytes is refused at policy.acl."""
        data = minimal()
        self.assertEqual(
            self.problems(data, token_size=lambda **kw: 1025),
            [
                "service.api.policy.acl: the PolicyContext for shard 'api-1' could reach "
                "1025 bytes, over the 1024-byte limit"
            ],
        )
        self.valid(data, token_size=lambda **kw: 1024)

    def test_sizer_arguments(self) -> None:
        """
        The sizer gets the claims' inputs and the bounds this configuration
        allows: sni as long as the longest name (a wildcard adds one label),
        no sub without client certificates.
        """
        calls: list[dict] = []

        def sizer(*, issuer, kid, service_id, shard_id, acl, sni_length=253, subject_length=256):
            calls.append(dict(issuer=issuer, kid=kid, service_id=service_id, shard_id=shard_id,
                              acl=tuple(acl), sni_length=sni_length, subject_length=subject_length))
            return 0

        data = minimal()
        data["service"]["api"]["names"] = ["api.example.test", "*.x.test", "long.example.test:8443"]
        data["service"]["api"]["policy"] = {"acl": ["a"]}
        self.valid(data, token_size=sizer)
        self.assertEqual(
            calls,
            [dict(issuer="edge-1", kid="policy-1", service_id="api", shard_id="api-1",
                  acl=("a",), sni_length=64 + len("x.test"), subject_length=None)],
        )

        calls.clear()
        data["listener"][0].update(mode="terminate", default_certificate={"cert": "a", "key": "b"}, client_ca="ca")
        self.valid(data, token_size=sizer)
        self.assertEqual(calls[0]["subject_length"], 256)

        calls.clear()
        data["listener"][0].update(mode="plain", identify=["line"])
        for key in ("default_certificate", "client_ca"):
            del data["listener"][0][key]
        self.valid(data, token_size=sizer)
        self.assertEqual((calls[0]["sni_length"], calls[0]["subject_length"]), (None, None))

    def test_older_sizer_signature(self) -> None:
        """A sizer that takes only the five basic keywords is called without the bounds."""
        seen: list[str] = []

        def sizer(*, issuer, kid, service_id, shard_id, acl):
            seen.append(shard_id)
            return 0

        self.valid(minimal(), token_size=sizer)
        self.assertEqual(seen, ["api-1"])

    def test_policy_module(self) -> None:
        """
        Without an injected sizer, shardtcp.policy's worst_case_token_size
        is used: a huge ACL is refused, the minimal policy passes.
        """
        sizer = config_module.default_token_size()
        if sizer is None:
            raise self.skipTest("shardtcp.policy has no worst_case_token_size yet")
        data = minimal()
        parse_config(copy.deepcopy(data), self.folder(), check_files=False)
        data["service"]["api"]["policy"] = {"acl": [f"scope-{i}:read" for i in range(100)]}
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, self.folder(), check_files=False)
        [problem] = caught.exception.problems
        self.assertTrue(
            problem.startswith("service.api.policy.acl: the PolicyContext for shard 'api-1' could reach "),
            problem,
        )


class FileTests(_Helpers, SynchronousTestCase):
    def test_syntax_error(self) -> None:
        """A TOML syntax error is one problem naming the file, line and column."""
        folder = self.folder()
        path = self.write(folder, "bad.toml", '[proxy]\nid = \n')
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(caught.exception.problems, [f"{path}: line 2, column 6: Invalid value"])
        self.assertEqual(check_config(path), [f"{path}: line 2, column 6: Invalid value"])

    def test_syntax_error_at_end(self) -> None:
        """An error at the end of the document still gets a line and column."""
        folder = self.folder()
        path = self.write(folder, "bad.toml", "[proxy]\nid = [1,\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        [problem] = caught.exception.problems
        self.assertRegex(problem, r"^" + re.escape(path) + r": line \d+, column \d+: ")

    def test_unreadable(self) -> None:
        """A missing configuration file is one problem, not a traceback."""
        path = os.path.join(self.folder(), "missing.toml")
        self.assertEqual(check_config(path), [f"{path}: cannot read: No such file or directory"])

    def test_error_text(self) -> None:
        """ConfigError's text is its problems, one per line, and check_config returns them."""
        folder = self.folder()
        text = MINIMAL_TOML.replace('id = "edge-1"', 'id = ""')
        path = self.write(folder, "c.toml", text.replace('kid = "policy-1"', "kid = 1"))
        with self.assertRaises(ConfigError) as caught:
            load_config(path, check_files=False)
        self.assertEqual(
            str(caught.exception),
            "proxy.id: must not be empty\nsigning.kid: expected a string, got 1",
        )
        self.assertEqual(
            check_config(path),
            [
                "proxy.id: must not be empty",
                f"signing.private_key: cannot read {os.path.join(folder, 'keys', 'policy.pem')}: "
                "No such file or directory",
                "signing.kid: expected a string, got 1",
            ],
        )



class ResolverTableTests(SynchronousTestCase):
    """[resolver] tunes the live-state numbers."""

    def load(self, extra: str):
        from shardtcp.config import parse_config
        import tomllib

        text = """
[proxy]
id = "edge-1"
[signing]
private_key = "k.pem"
kid = "k"
[service.api]
names = ["api.example.test"]
[[service.api.shard]]
id = "a"
address = "127.0.0.1:1"
""" + extra
        return parse_config(tomllib.loads(text), "/tmp", check_files=False)

    def test_defaults_and_values(self):
        """Absent: the documented defaults; present: the given values."""
        self.assertEqual(self.load("").resolver.latency_decay, 10.0)
        tuned = self.load('[resolver]\nlatency_decay = "30s"\neject_after = 5\npanic_threshold = 0.25\n').resolver
        self.assertEqual((tuned.latency_decay, tuned.eject_after, tuned.panic_threshold), (30.0, 5, 0.25))

    def test_bad_values(self):
        """Each bad value is reported with its key path."""
        from shardtcp.config import ConfigError

        with self.assertRaises(ConfigError) as raised:
            self.load('[resolver]\nlatency_decay = "0s"\neject_base = "1m"\neject_max = "10s"\npanic_threshold = 2\nejct_after = 1\n')
        text = str(raised.exception)
        for key in ("resolver.latency_decay", "resolver.eject_max", "resolver.panic_threshold", "resolver.ejct_after"):
            self.assertIn(key, text)
