"""
The ``shardtcp`` command and ``twistd shardtcp``: exit statuses and what
they print, run as real subprocesses where the contract is about processes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from shardtcp import keys as keymod, proxyv2
from shardtcp.cli import main
from shardtcp.policy import PolicyContext, PolicySigner

BIN = os.path.dirname(sys.executable)

GOOD = """
[proxy]
id = "edge-1"
location = { lat = 50.11, lon = 8.68, region = "eu-central" }
[signing]
private_key = "keys/policy-1.pem"
kid = "policy-1"
[[listener]]
name = "edge"
listen = "tcp:0:interface=127.0.0.1"
[service.api]
names = ["api.example.test"]
[[service.api.shard]]
id = "api-fra-1"
address = "127.0.0.1:9001"
location = { lat = 50.11, lon = 8.68, region = "eu-central" }
[[service.api.shard]]
id = "api-nyc-1"
address = "127.0.0.1:9002"
location = { lat = 40.71, lon = -74.0, region = "us-east" }
[geo]
networks = [ { cidr = "198.51.100.0/24", lat = 40.71, lon = -74.0, region = "us-east" } ]
"""


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


class CommandTests(SynchronousTestCase):
    """check-config, keygen, explain, sign-feed, decode-header."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.keys = keymod.generate_keypair(os.path.join(self.dir, "keys"), kid="policy-1")

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_check_config_valid(self):
        """A valid file: exit 0."""
        status, out, _ = run_cli("check-config", self.write("ok.toml", GOOD))
        self.assertEqual(status, 0)
        self.assertIn("valid", out)

    def test_check_config_problems_name_key_paths(self):
        """Each problem is one line naming its key path; exit 1."""
        bad = GOOD.replace('address = "127.0.0.1:9002"', 'address = "nowhere"').replace(
            'listen = "tcp:0', 'idnetify = ["sni"]\nlisten = "tcp:0'
        )
        status, _, err = run_cli("check-config", self.write("bad.toml", bad))
        self.assertEqual(status, 1)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(any(l.startswith("service.api.shard[1].address: ") for l in lines), lines)
        self.assertTrue(any(l.startswith("listener[0].idnetify: unknown key") for l in lines), lines)

    def test_twistd_refuses_bad_config_without_traceback(self):
        """``twistd -n shardtcp`` prints the same lines and exits 1, no traceback."""
        bad = GOOD.replace('address = "127.0.0.1:9002"', 'address = "nowhere"')
        done = subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "shardtcp", "--config", self.write("bad.toml", bad)],
            capture_output=True,
            timeout=60,
            cwd=self.dir,
        )
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 1, err)
        self.assertIn("shardtcp: service.api.shard[1].address: ", err)
        self.assertNotIn("Traceback", err)

    def test_keygen(self):
        """keygen writes a 0600 private key, its public key and a JWKS with the kid."""
        out_dir = os.path.join(self.dir, "new")
        status, out, _ = run_cli("keygen", "--out", out_dir, "--kid", "k2")
        self.assertEqual(status, 0)
        mode = stat.S_IMODE(os.stat(os.path.join(out_dir, "k2.pem")).st_mode)
        self.assertEqual(mode, 0o600)
        with open(os.path.join(out_dir, "jwks.json")) as f:
            jwks = json.load(f)
        self.assertEqual([k["kid"] for k in jwks["keys"]], ["k2"])
        self.assertEqual(jwks["keys"][0]["crv"], "Ed25519")
        status, _, err = run_cli("keygen", "--out", out_dir, "--kid", "k2")
        self.assertEqual(status, 1)
        self.assertIn("refusing to overwrite an existing private key", err)

    def test_explain_key(self):
        """
        explain --key K prints the key's owner chain: the rendezvous owner
        takes it; with owners pinning the key, the pinned shard leads, marked
        pinned; --json carries the same chain; no --key, no chain.
        """
        from shardtcp.resolver.ownership import Shard, owner_order

        keyed = GOOD.replace('names = ["api.example.test"]', 'names = ["api.example.test"]\nshard_key = "sni-label"')
        path = self.write("keyed.toml", keyed)
        expected = [s.shard_id for s in owner_order("tenant42", [Shard("api-fra-1"), Shard("api-nyc-1")])]
        status, out, _ = run_cli("explain", "--config", path, "--service", "api", "--client", "10.1.1.1", "--key", "tenant42")
        self.assertEqual(status, 0)
        tail = out.splitlines()[-3:]
        self.assertEqual(tail[0], "owners of key 'tenant42':")
        self.assertEqual(tail[1].split(), ["1", expected[0], "takes", "it", "0/1", "open"])
        self.assertEqual(tail[2].split(), ["2", expected[1], "next", "0/1", "open"])
        pinned = keyed + f'[service.api.owners]\n"tenant4*" = ["{expected[1]}"]\n'
        status, out, _ = run_cli(
            "explain", "--config", self.write("pinned.toml", pinned), "--service", "api",
            "--client", "10.1.1.1", "--key", "tenant42", "--json",
        )
        self.assertEqual(status, 0)
        document = json.loads(out)
        self.assertEqual(document["key"], "tenant42")
        self.assertEqual(
            [(o["shard"], o["pinned"], o["takes"]) for o in document["owners"]],
            [(expected[1], True, True), (expected[0], False, False)],
        )
        status, out, _ = run_cli("explain", "--config", path, "--service", "api", "--client", "10.1.1.1", "--json")
        self.assertNotIn("owners", json.loads(out))

    def test_explain(self):
        """explain ranks the US shard first for a US client, factor by factor."""
        status, out, _ = run_cli(
            "explain", "--config", self.write("ok.toml", GOOD), "--service", "api", "--client", "198.51.100.7", "--json"
        )
        self.assertEqual(status, 0)
        ranking = json.loads(out)
        self.assertEqual([s["shard"] for s in ranking["shards"]], ["api-nyc-1", "api-fra-1"])
        self.assertEqual(ranking["location_source"], "geo")
        self.assertGreater(ranking["shards"][1]["details"]["distance_km"], 6000)
        status, text, _ = run_cli("explain", "--config", self.write("ok.toml", GOOD), "--service", "api", "--client", "10.1.1.1")
        self.assertIn("(proxy)", text.splitlines()[0])

    def signed_feed(self, name, deny, shards=None):
        """A feed file signed with the test key, valid for ten minutes."""
        from shardtcp.resolver.feeds import sign_feed

        now = int(time.time())
        claims = {"iss": "intel", "iat": now - 5, "exp": now + 600, "seq": 1,
                  "shards": shards or {}, "deny": list(deny)}
        token = sign_feed(claims, keymod.load_private_key(self.keys.private_key), "policy-1")
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(token)
        return path

    def test_explain_denied_by_policy(self):
        """
        A client the service policy denies is shown DENIED with the rule,
        no shard is ranked for it, and explain exits 1.
        """
        config = GOOD + '[service.api.policy]\ndeny = ["198.51.100.0/24"]\n'
        path = self.write("deny.toml", config)
        status, out, _ = run_cli("explain", "--config", path, "--service", "api", "--client", "198.51.100.7")
        self.assertEqual(status, 1)
        self.assertIn("DENIED: policy.deny 198.51.100.0/24", out)
        status, out, _ = run_cli(
            "explain", "--config", path, "--service", "api", "--client", "198.51.100.7", "--json"
        )
        self.assertEqual(status, 1)
        ranking = json.loads(out)
        self.assertEqual(ranking["denied"], "policy.deny 198.51.100.0/24")
        self.assertEqual([s["eligible"] for s in ranking["shards"]], [False, False])
        status, _, _ = run_cli("explain", "--config", path, "--service", "api", "--client", "10.1.1.1")
        self.assertEqual(status, 0)

    def test_explain_applies_threat_feeds(self):
        """
        explain uses the threat feeds in force: a client a feed denies is
        DENIED (exit 1) naming the feed, and a feed's security score
        replaces the shard's baseline in the ranking of other clients.
        """
        feed = self.signed_feed("threat.jws", ["198.51.100.0/24"], {"api-fra-1": 20})
        config = GOOD + (
            f'[threat_intel]\ntrusted_keys = "{self.keys.jwks}"\n'
            f'feeds = [ {{ source = "{feed}" }} ]\n'
        )
        path = self.write("feeds.toml", config)
        status, out, _ = run_cli(
            "explain", "--config", path, "--service", "api", "--client", "198.51.100.7", "--json"
        )
        self.assertEqual(status, 1, out)
        ranking = json.loads(out)
        self.assertIn("threat feed intel", ranking["denied"])
        self.assertIn("198.51.100.0/24", ranking["denied"])
        self.assertFalse(any(s["eligible"] for s in ranking["shards"]))
        status, out, _ = run_cli(
            "explain", "--config", path, "--service", "api", "--client", "10.1.1.1", "--json"
        )
        self.assertEqual(status, 0, out)
        scores = {s["shard"]: s["details"]["security_score"] for s in json.loads(out)["shards"]}
        self.assertEqual(scores["api-fra-1"], 20)

    def test_explain_client_not_an_ip(self):
        """--client that is not an IP address is one line on stderr and exit 2."""
        status, out, err = run_cli(
            "explain", "--config", self.write("ok.toml", GOOD), "--service", "api", "--client", "notanip"
        )
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertEqual(err.strip().splitlines(), ["shardtcp explain: --client 'notanip' is not an IP address"])

    def test_sign_feed(self):
        """sign-feed prints a compact JWS signed with the given kid; an expired feed is refused."""
        now = int(time.time())
        feed = {"iss": "intel", "iat": now, "exp": now + 600, "seq": 1, "shards": {"api-fra-1": 20}, "deny": []}
        path = self.write("feed.json", json.dumps(feed))
        status, out, _ = run_cli("sign-feed", "--key", self.keys.private_key, "--kid", "policy-1", path)
        self.assertEqual(status, 0)
        self.assertEqual(out.count("."), 2)
        feed["iat"], feed["exp"] = now - 600, now - 10
        status, _, err = run_cli(
            "sign-feed", "--key", self.keys.private_key, "--kid", "policy-1", self.write("old.json", json.dumps(feed))
        )
        self.assertEqual(status, 1)
        self.assertIn("expired", err)

    def test_decode_header(self):
        """decode-header reads a hex capture, lists TLVs, and verifies the token with --jwks."""
        signer = PolicySigner(
            keymod.load_private_key(self.keys.private_key), kid="policy-1", issuer="edge-1", ttl=30, now=time.time
        )
        token = signer.sign(
            policy=PolicyContext("tls", ("none",), ("orders:read",)),
            audience="api-fra-1",
            connection_id="A" * 24,
            service="api",
            source=("192.0.2.7", 5000),
            destination=("127.0.0.1", 8443),
            sni="api.example.test",
        )
        header = proxyv2.encode(
            proxyv2.ProxyHeader(
                source=("192.0.2.7", 5000),
                destination=("127.0.0.1", 8443),
                tlvs=((0x02, b"api.example.test"), (0x05, b"A" * 24), (0xE0, token)),
            )
        )
        path = self.write("capture.hex", header.hex())
        status, out, _ = run_cli("decode-header", path, "--jwks", self.keys.jwks)
        self.assertEqual(status, 0, out)
        self.assertIn("source 192.0.2.7:5000", out)
        self.assertIn("TLV AUTHORITY: 'api.example.test'", out)
        self.assertIn("signature valid", out)
        self.assertIn("binding valid", out)
        tampered = bytearray(header)
        tampered[20] ^= 1
        status, out, _ = run_cli("decode-header", self.write("bad.hex", bytes(tampered).hex()))
        self.assertEqual(status, 1)
        self.assertIn("invalid PROXY header", out)


class ExampleTests(SynchronousTestCase):
    """etc/shardtcp.toml is a working example once init-example has run."""

    def test_init_example_makes_the_example_valid(self):
        """In a copy of etc/, check-config fails before init-example and passes after."""
        import shutil

        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "shardtcp.toml")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        config = os.path.join(folder, "shardtcp.toml")
        shutil.copyfile(here, config)
        status, _, err = run_cli("check-config", config)
        self.assertEqual(status, 1)
        self.assertIn("signing.private_key: cannot read", err)
        status, out, _ = run_cli("init-example", folder)
        self.assertEqual(status, 0)
        self.assertIn(os.path.join(folder, "feeds", "threat.jws"), out)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(folder, "keys", "policy-1.pem")).st_mode), 0o600)
        # The example's fixed ports may be taken on a test machine: its
        # validity, not this machine's free ports, is what is tested here.
        status, out, err = run_cli("check-config", "--no-listen", config)
        self.assertEqual((status, err), (0, ""))


class ListenCheckTests(SynchronousTestCase):
    """check-config and ``twistd -n shardtcp`` with a port another socket holds."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        keymod.generate_keypair(os.path.join(self.dir, "keys"), kid="policy-1")
        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        self.port = held.getsockname()[1]
        self.listen = f"tcp:{self.port}:interface=127.0.0.1"
        self.path = os.path.join(self.dir, "busy.toml")
        with open(self.path, "w") as f:
            f.write(GOOD.replace('listen = "tcp:0:interface=127.0.0.1"', f'listen = "{self.listen}"'))

    def test_check_config_port_in_use(self):
        """check-config binds each port and says when one is in use: exit 1, one line."""
        status, out, err = run_cli("check-config", self.path)
        self.assertEqual(status, 1)
        self.assertEqual(
            err.splitlines(),
            [f"listener[0].listen: cannot listen on {self.listen}: Address already in use"],
        )
        status, out, err = run_cli("check-config", "--no-listen", self.path)
        self.assertEqual((status, err), (0, ""))

    def test_check_config_notes(self):
        """A tls health check without a CA is a warning on stdout; the file stays valid."""
        path = self.path.replace("busy", "notes")
        with open(path, "w") as f:
            f.write(GOOD.replace(
                'address = "127.0.0.1:9002"',
                'address = "127.0.0.1:9002"\nhealth_check = { kind = "tls" }',
            ))
        status, out, err = run_cli("check-config", path)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("service.api.shard[1].health_check: warning: "), lines)
        self.assertEqual(lines[1], f"{path}: valid")

    def test_twistd_port_in_use(self):
        """
        ``twistd -n shardtcp`` on a port in use: exit 1, one line on stderr
        naming the listener, the endpoint and the OS error, no traceback.
        """
        done = subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "shardtcp", "--config", self.path],
            capture_output=True,
            timeout=60,
            cwd=self.dir,
        )
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 1, err)
        self.assertEqual(
            err.splitlines(),
            [f"shardtcp: listener 'edge': cannot listen on {self.listen}: "
             "Address already in use; not starting"],
        )
        self.assertNotIn("Traceback", done.stdout.decode())
