"""
What the admin interface reads from the configuration: the token file, the
JWKS it serves, and the rule that an admin endpoint beyond loopback needs a
token.
"""

from __future__ import annotations

import json
import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shardtcp.admin import MAX_TOKEN_BYTES, AdminError, jwks_for, read_token
from shardtcp.config import ConfigError, parse_config
from shardtcp.keys import generate_keypair, load_jwks
from shardtcp.model import SigningConfig
from shardtcp.tap import build_admin_service, build_service
from tests.config.test_sections import minimal, no_size


class TokenFileTests(SynchronousTestCase):
    """read_token."""

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_token(self) -> None:
        """The token is the file's content without surrounding whitespace."""
        self.assertEqual(read_token(self.write(b"  abc-123\n")), b"abc-123")

    def test_bounds(self) -> None:
        """A token of MAX_TOKEN_BYTES is read; one byte more is refused."""
        self.assertEqual(len(read_token(self.write(b"a" * MAX_TOKEN_BYTES))), MAX_TOKEN_BYTES)
        with self.assertRaises(AdminError) as caught:
            read_token(self.write(b"a" * (MAX_TOKEN_BYTES + 1)))
        self.assertIn("larger than 4096 bytes", str(caught.exception))

    def test_bad_files(self) -> None:
        """Missing, empty and multi-word token files are one-line errors naming admin.token_file."""
        for path, words in (
            (os.path.join(self.mktemp(), "none"), "cannot read"),
            (self.write(b"\n\n"), "is empty"),
            (self.write(b"two words"), "printable ASCII without spaces"),
            (self.write("tökén".encode()), "printable ASCII without spaces"),
        ):
            with self.assertRaises(AdminError) as caught:
                read_token(path)
            self.assertTrue(str(caught.exception).startswith("admin.token_file: "))
            self.assertIn(words, str(caught.exception))


class JWKSTests(SynchronousTestCase):
    """jwks_for."""

    def setUp(self) -> None:
        self.keys = generate_keypair(self.mktemp(), kid="policy-1")

    def test_from_key(self) -> None:
        """Without [signing] jwks, the JWKS is built from the signing key's public half."""
        document = jwks_for(SigningConfig(private_key=self.keys.private_key, kid="policy-1"))
        self.assertNotIn(b'"d"', document)
        self.assertEqual(load_jwks(self.write(document)).keys(), load_jwks(self.keys.jwks).keys())
        self.assertEqual(json.loads(document), json.load(open(self.keys.jwks)))

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_file_served_as_is(self) -> None:
        """A [signing] jwks file holding the active kid is served byte for byte."""
        with open(self.keys.jwks, "rb") as f:
            original = f.read()
        signing = SigningConfig(private_key=self.keys.private_key, kid="policy-1", jwks=self.keys.jwks)
        self.assertEqual(jwks_for(signing), original)

    def test_file_without_active_kid(self) -> None:
        """A jwks file that does not hold the active kid is refused, as are non-JWKS files."""
        cases = (
            (self.keys.jwks, "policy-2", "does not hold the active kid 'policy-2'"),
            (self.write(b"{"), "policy-1", "is not JSON"),
            (self.write(b"[]"), "policy-1", 'has no "keys" list'),
            (os.path.join(self.mktemp(), "x"), "policy-1", "cannot read"),
        )
        for path, kid, words in cases:
            with self.assertRaises(AdminError) as caught:
                jwks_for(SigningConfig(private_key=self.keys.private_key, kid=kid, jwks=path))
            self.assertTrue(str(caught.exception).startswith("signing.jwks: "))
            self.assertIn(words, str(caught.exception))


class ExposureTests(SynchronousTestCase):
    """A non-loopback admin endpoint without token_file is a configuration error."""

    def problems(self, admin: dict) -> list:
        data = minimal()
        data["admin"] = admin
        try:
            parse_config(data, self.mktemp(), check_files=False, token_size=no_size)
        except ConfigError as e:
            return e.problems
        return []

    def test_loopback_without_token(self) -> None:
        """Loopback (IPv4, IPv6) and UNIX sockets need no token."""
        for listen in ("tcp:9901:interface=127.0.0.1", "tcp:9901:interface=127.0.0.2",
                       "tcp6:9901:interface=\\:\\:1", "unix:/tmp/admin.sock"):
            self.assertEqual(self.problems({"listen": listen}), [], listen)

    def test_exposed_without_token(self) -> None:
        """Every interface, or a routable one, without token_file: one line naming admin.token_file."""
        for listen in ("tcp:9901", "tcp:9901:interface=0.0.0.0", "tcp:9901:interface=192.0.2.1",
                       "tcp6:9901"):
            [problem] = self.problems({"listen": listen})
            self.assertTrue(problem.startswith(f"admin.token_file: required when admin.listen ({listen})"), problem)

    def test_exposed_with_token(self) -> None:
        """With token_file, any interface is accepted."""
        self.assertEqual(self.problems({"listen": "tcp:9901", "token_file": "admin.token"}), [])


class ServiceTests(SynchronousTestCase):
    """build_admin_service and build_service."""

    def config(self, admin: dict | None):
        folder = os.path.abspath(self.mktemp())
        keys = generate_keypair(os.path.join(folder, "keys"), kid="policy-1")
        data = minimal()
        data["signing"]["private_key"] = keys.private_key
        if admin is not None:
            data["admin"] = admin
        return parse_config(data, folder, check_files=False, token_size=no_size)

    def test_none_without_admin(self) -> None:
        """No [admin] table: no admin service, none in the tree."""
        config = self.config(None)
        reactor = MemoryReactorClock()
        root = build_service(config, reactor)
        self.assertEqual([s.name for s in root if s.name == "admin"], [])

    def test_listens_on_admin_only(self) -> None:
        """With [admin], the tree holds a service named admin that listens on [admin].listen."""
        config = self.config({"listen": "tcp:9901:interface=127.0.0.1"})
        reactor = MemoryReactorClock()
        root = build_service(config, reactor)
        root.startService()
        self.addCleanup(root.stopService)
        ports = {(p[0], p[3]) for p in reactor.tcpServers}
        self.assertIn((9901, "127.0.0.1"), ports)
        admin = root.getServiceNamed("admin")
        self.assertEqual(admin.description, "tcp:9901:interface=127.0.0.1")
        self.assertEqual(admin.factory.logPrefix(), "shardtcp-admin")

    def test_bad_token_file(self) -> None:
        """An unreadable token file stops the build with AdminError."""
        config = self.config({"listen": "tcp:9901:interface=127.0.0.1", "token_file": "missing.token"})
        with self.assertRaises(AdminError):
            build_admin_service(config, MemoryReactorClock(), resolver=None, metrics=None)


class IdleTimeoutTests(SynchronousTestCase):
    """The admin site drops idle connections."""

    def test_idle_connection_closed(self) -> None:
        """A connection that sends nothing is closed after ADMIN_IDLE_TIMEOUT seconds, not before."""
        from twisted.internet.testing import StringTransport

        from shardtcp.admin._site import ADMIN_IDLE_TIMEOUT
        from tests.admin.support import AdminFixture

        admin = AdminFixture()
        transport = StringTransport()
        channel = admin.site.buildProtocol(None)
        channel.makeConnection(transport)
        admin.clock.advance(ADMIN_IDLE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        admin.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)


def empty_token_options(case: SynchronousTestCase):
    """
    ``(folder, Options)`` of ``twistd shardtcp`` for a valid configuration
    in a new folder whose admin token file is empty: ``makeService`` reads
    it and stops.
    """
    from shardtcp.tap import Options

    folder = os.path.abspath(case.mktemp())
    keys = generate_keypair(os.path.join(folder, "keys"), kid="policy-1")
    with open(os.path.join(folder, "admin.token"), "w") as f:
        f.write("\n")
    path = os.path.join(folder, "shardtcp.toml")
    with open(path, "w") as f:
        f.write(
            f'[proxy]\nid = "edge-1"\n[signing]\nprivate_key = "{keys.private_key}"\nkid = "policy-1"\n'
            '[[listener]]\nname = "edge"\nlisten = "tcp:0:interface=127.0.0.1"\n'
            '[service.api]\nnames = ["api.example.test"]\n'
            '[[service.api.shard]]\nid = "api-1"\naddress = "127.0.0.1:9001"\n'
            '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
        )
    options = Options()
    options.parseOptions(["--config", path])
    return folder, options


class MakeServiceTests(SynchronousTestCase):
    """twistd's entry point with an unusable admin token."""

    def test_empty_token_file(self) -> None:
        """An empty token file stops start-up with one line on stderr and exit status 1, no traceback."""
        import io
        from contextlib import redirect_stderr

        from shardtcp.tap import makeService

        folder, options = empty_token_options(self)
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            makeService(options, MemoryReactorClock())
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(
            err.getvalue(),
            f"shardtcp: admin.token_file: {os.path.join(folder, 'admin.token')} is empty\nshardtcp: not starting\n",
        )
