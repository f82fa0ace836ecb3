"""
The etcd client a ``[registry]`` gives: username/password auth and TLS with a
client certificate, against a real etcd; and the configuration keys.
"""

from __future__ import annotations

import os
import tomllib

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shardtcp.config import ConfigError, parse_config
from shardtcp.example.pki import CertificateAuthority
from shardtcp.model import RegistryConfig
from shardtcp.registry.access import etcd_client, read_password
from shardtcp.registry.etcd import EtcdAuthError, EtcdClient, EtcdError
from tests.e2e.harness import EtcdServer, free_port


class AuthTests(TestCase):
    """Username and password: a token from /v3/auth/authenticate, renewed when etcd forgets it."""

    timeout = 60

    async def test_token_and_renewal(self):
        """With auth enabled a client without credentials is refused; one with them works, and after an
        etcd restart (its tokens gone) it authenticates again by itself."""
        server = EtcdServer(self)
        await server.start()
        admin = EtcdClient(reactor, [server.url])
        await admin.call("/v3/auth/user/add", {"name": "root", "password": "rootpw"})
        await admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await admin.call("/v3/auth/enable", {})
        with self.assertRaises(EtcdError):
            await admin.put(b"/shardtcp/x", b"1")
        directory = self.mktemp()
        os.makedirs(directory)
        password_file = os.path.join(directory, "password")
        with open(password_file, "w") as f:
            f.write("rootpw\n")
        client = etcd_client(
            RegistryConfig(kind="etcd", endpoints=(server.url,), username="root", password_file=password_file),
            reactor,
        )
        await client.put(b"/shardtcp/x", b"1")
        revision, kvs = await client.range(b"/shardtcp/")
        self.assertEqual([kv.value for kv in kvs], [b"1"])
        self.assertEqual(client.authentications, 1)
        await server.stop()
        await server.start()
        _, kvs = await client.range(b"/shardtcp/")
        self.assertEqual([kv.value for kv in kvs], [b"1"])
        self.assertEqual(client.authentications, 2)
        wrong = EtcdClient(reactor, [server.url], username="root", password="nope")
        with self.assertRaises(EtcdError) as caught:
            await wrong.range(b"/shardtcp/")
        self.assertNotIsInstance(caught.exception, EtcdAuthError)
        self.assertIn("authentication failed", str(caught.exception))


def _etcd_pki(directory: str) -> tuple:
    """
    A CA, etcd's certificate and a client's, as PEM files.  etcd 3.4's JSON
    gateway dials its own TLS port with the server certificate, so with
    ``--client-cert-auth`` that certificate must allow clientAuth too.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(name, key, issuer, issuer_key, ca=False, usages=(), sans=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem, cert, key=None):
        paths = [os.path.join(directory, f"{stem}.pem")]
        with open(paths[0], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths.append(os.path.join(directory, f"{stem}.key"))
            with open(paths[1], "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return paths

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd test CA")])
    ca = build("etcd test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = build("localhost", server_key, ca_name, ca_key,
                   usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
                   sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client = build("proxy", client_key, ca_name, ca_key, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    return (write("ca", ca)[0], *write("etcd", server, server_key), *write("client", client, client_key))


class TLSTests(TestCase):
    """TLS to etcd: its certificate checked against ``ca``, a client certificate shown."""

    timeout = 60

    async def test_client_certificate(self):
        """A client with the CA and a client certificate reads and writes over https; one without
        the client certificate, or trusting another CA, is refused."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca_path, server_cert, server_key, client_cert, client_key = _etcd_pki(directory)
        other_ca = CertificateAuthority("someone else").write(directory, "other")
        server = EtcdServer(self)
        tls_port = free_port()
        tls_url = f"https://localhost:{tls_port}"
        server.extra_args = [
            "--listen-client-urls", f"{server.url},https://127.0.0.1:{tls_port}",
            "--advertise-client-urls", f"{server.url},{tls_url}",
            "--cert-file", server_cert, "--key-file", server_key,
            "--trusted-ca-file", ca_path, "--client-cert-auth",
        ]
        await server.start()
        good = etcd_client(RegistryConfig(kind="etcd", endpoints=(tls_url,), ca=ca_path, cert=client_cert,
                                          key=client_key), reactor)
        await good.put(b"/shardtcp/t", b"tls")
        _, kvs = await good.range(b"/shardtcp/")
        self.assertEqual([kv.value for kv in kvs], [b"tls"])
        for config in (
            RegistryConfig(kind="etcd", endpoints=(tls_url,), ca=ca_path),
            RegistryConfig(kind="etcd", endpoints=(tls_url,), ca=other_ca, cert=client_cert, key=client_key),
        ):
            with self.assertRaises(EtcdError):
                await etcd_client(config, reactor).range(b"/shardtcp/")


class ConfigTests(SynchronousTestCase):
    """The [registry] access keys, each problem one line."""

    def problems(self, text: str) -> list:
        base = '[proxy]\nid = "e"\n[signing]\nprivate_key = "k.pem"\nkid = "k"\n'
        try:
            parse_config(tomllib.loads(base + text), "/nowhere", check_files=False)
        except ConfigError as e:
            return [p for p in e.problems if "registry" in p]
        return []

    def test_keys(self):
        """cert without key, username without password_file, TLS on http endpoints and the keys
        with the static registry are refused; a complete https setup is accepted."""
        etcd = '[registry]\nkind = "etcd"\n'
        self.assertEqual(self.problems(etcd + 'endpoints = ["https://e:2379"]\ncert = "c.pem"\n'),
                         ["registry.key: cert and key go together"])
        self.assertEqual(self.problems(etcd + 'username = "u"\n'),
                         ["registry.password_file: username and password_file go together"])
        self.assertEqual(self.problems(etcd + 'ca = "ca.pem"\n'),
                         ["registry.endpoints: ca, cert and key need https:// endpoints"])
        self.assertEqual(self.problems('[registry]\nca = "ca.pem"\n'), ['registry.ca: only with kind = "etcd"'])
        self.assertEqual(self.problems(
            etcd + 'endpoints = ["https://e:2379"]\nca = "ca.pem"\ncert = "c.pem"\nkey = "c.key"\n'
            'username = "u"\npassword_file = "pw"\n'), [])

    def test_password_file(self):
        """The password is the file's first line; a missing file is one line naming it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\r\nignored\n")
        self.assertEqual(read_password(path), "s3cret")
        with self.assertRaises(EtcdError) as caught:
            read_password(path + ".missing")
        self.assertEqual(str(caught.exception), f"registry.password_file {path}.missing: No such file or directory")


class CommandAuthTests(TestCase):
    """``shardtcp register`` and ``shardtcp ctl --fleet`` authenticate to an etcd with auth on."""

    timeout = 90

    async def test_register_and_fleet_ctl_with_auth(self):
        """
        With etcd auth enabled: ``register`` with --username/--password-file
        registers the shard, ``ctl --fleet`` (the config's [registry]
        username and password_file) writes a drain; ``ctl --etcd`` without
        credentials is refused with one line.
        """
        import json
        import sys

        from twisted.internet.task import deferLater

        from tests.e2e.harness import child_environment, run_child, spawn, wait_until

        server = EtcdServer(self)
        await server.start()
        admin = EtcdClient(reactor, [server.url])
        await admin.call("/v3/auth/user/add", {"name": "root", "password": "rootpw"})
        await admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await admin.call("/v3/auth/enable", {})
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        password_file = os.path.join(directory, "password")
        with open(password_file, "w") as f:
            f.write("rootpw\n")
        reader = etcd_client(
            RegistryConfig(kind="etcd", endpoints=(server.url,), username="root", password_file=password_file),
            reactor,
        )
        spawn(self, [sys.executable, "-m", "shardtcp", "register", "--endpoints", server.url, "--service", "api",
                     "--id", "api-auth", "--address", "127.0.0.1:9700", "--username", "root",
                     "--password-file", password_file], env=child_environment(), timeout=80)
        found: list = []

        async def look() -> None:
            _, kvs = await reader.range(b"/shardtcp/shards/")
            found[:] = [kv.key for kv in kvs]

        for _ in range(150):
            await look()
            if found:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(found, [b"/shardtcp/shards/api/api-auth"])

        config = os.path.join(directory, "fleet.toml")
        with open(config, "w") as f:
            f.write(
                '[proxy]\nid = "edge-x"\n[signing]\nprivate_key = "none.pem"\nkid = "k"\n'
                '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\n'
                '[service.api]\nnames = ["api.example.test"]\n'
                f'[registry]\nkind = "etcd"\nendpoints = ["{server.url}"]\nprefix = "/shardtcp"\n'
                f'username = "root"\npassword_file = "password"\n'
            )
        ok = await run_child(self, [sys.executable, "-m", "shardtcp", "ctl", "--fleet", "--config", config,
                                    "drain", "api-auth"], env=child_environment())
        self.assertEqual(ok.status, 0, ok.err)
        self.assertEqual(json.loads(ok.out)["fleet"], {"state": "drain"})
        _, kvs = await reader.range(b"/shardtcp/admin/")
        self.assertEqual([json.loads(kv.value) for kv in kvs], [{"state": "drain"}])
        refused = await run_child(self, [sys.executable, "-m", "shardtcp", "ctl", "--etcd", server.url,
                                         "ready", "api-auth"], env=child_environment())
        self.assertEqual(refused.status, 1)
        self.assertEqual(len(refused.err.strip().splitlines()), 1, refused.err)
