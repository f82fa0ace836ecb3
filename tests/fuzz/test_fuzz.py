"""
Bounded fuzzing of every parser and verifier, run by ``trial tests``.

Each test draws inputs for one target of ``tests.fuzz.targets`` (random
bytes, edits of the seed corpus, and inputs built with the target's
structure in mind) for a time budget set by the Hypothesis profile named
in ``SHARDTCP_FUZZ_PROFILE``: ``shardtcp-fuzz`` (the default, about a
second per target) or ``shardtcp-fuzz-ci`` (about 20 s per target, what
``.ci/run`` selects).  A finding fails the test with Hypothesis's shrunk
input; ``python -m tests.fuzz.run TARGET --seconds N`` runs one target
longer, coverage-guided when atheris is installed.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from twisted.trial.unittest import SynchronousTestCase

from shardtcp import proxyv2
from shardtcp.backend import VerificationError
from shardtcp.policy import PolicyContext, PolicySigner
from shardtcp.proxyv2 import ProxyHeader
from shardtcp.resolver.feeds import FeedRejected, FeedState, sign_feed
from tests.fuzz import seeds, targets

#: The environment variable that picks the profile, and the profiles'
#: time budget per target in seconds.
PROFILE_VARIABLE = "SHARDTCP_FUZZ_PROFILE"
BUDGETS = {"shardtcp-fuzz": 1.0, "shardtcp-fuzz-ci": 20.0}
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# One profile runs a batch of examples; a test runs batches until its
# budget is spent, so the bound is time, not a count of examples.
# Findings are kept beside the checkout (``.hypothesis/`` is ignored by
# git), not in trial's temporary folder, so that the next run tries them
# first.
_DATABASE = DirectoryBasedExampleDatabase(
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".hypothesis", "fuzz")
)
settings.register_profile(
    "shardtcp-fuzz", max_examples=25, deadline=None, suppress_health_check=_HEALTH, print_blob=True,
    database=_DATABASE,
)
settings.register_profile(
    "shardtcp-fuzz-ci", max_examples=50, deadline=None, suppress_health_check=_HEALTH, print_blob=True,
    database=_DATABASE,
)


def profile_name() -> str:
    """The profile ``SHARDTCP_FUZZ_PROFILE`` names (``shardtcp-fuzz`` when unset)."""
    name = os.environ.get(PROFILE_VARIABLE, "shardtcp-fuzz")
    if name not in BUDGETS:
        raise ValueError(f"{PROFILE_VARIABLE}={name!r}: expected one of {sorted(BUDGETS)}")
    return name


def fuzz_for_budget(strategy, check, seconds: float | None = None) -> int:
    """
    Run ``check`` on examples of ``strategy`` in batches of the profile's
    size until ``seconds`` (default: the profile's budget) are spent, at
    least one batch.  Returns how many batches ran; a failing example raises.
    """
    name = profile_name()
    deadline = time.monotonic() + (BUDGETS[name] if seconds is None else seconds)

    @settings(settings.get_profile(name))
    @given(strategy)
    def batch(value):
        check(value)

    batches = 0
    while True:
        batch()
        batches += 1
        if time.monotonic() >= deadline:
            return batches


def edited(corpus: list[bytes]):
    """Seeds with random edits after their mode byte (``targets.apply_edits``)."""
    return st.tuples(st.sampled_from(corpus), st.binary(max_size=24)).map(
        lambda pair: pair[0][:1] + targets.apply_edits(pair[0][1:], pair[1])
    )


def inputs(target: str, *structured):
    """Raw bytes, edited seeds, and the target's structured inputs."""
    corpus = seeds.read_corpus(target) or list(seeds.seeds()[target].values())
    return st.one_of(st.binary(max_size=512), edited(corpus), *structured)


# ---------------------------------------------------------------------------
# Structured inputs

_addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)


@st.composite
def reframed_headers(draw):
    """The genuine header with its version/command or family/transport byte changed, CRC32C recomputed."""
    wire = bytearray(targets.genuine_wire())
    index = draw(st.sampled_from([12, 13]))
    if index == 13:
        wire[13] = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]))
    else:
        wire[12] = draw(st.sampled_from([0x20, 0x21, 0x22, 0x2F, 0x11]))
    return b"\x01" + targets.apply_edits(bytes(wire), b"")


def _header_wire(source, destination, tlvs) -> bytes:
    header = ProxyHeader(command=proxyv2.Command.PROXY, source=source, destination=destination, tlvs=tlvs)
    return targets.with_crc(proxyv2.encode(header, crc32c=False))


@st.composite
def rebound_headers(draw):
    """
    The genuine token (or one edited by a character) in a header whose
    addresses, connection id or TLV order an attacker chose.
    """
    tlvs = targets.genuine_tlvs()[:-1]
    source = draw(st.one_of(st.just(targets.CLIENT), _addresses))
    destination = draw(st.one_of(st.just(targets.PROXY_ADDRESS), _addresses))
    if draw(st.booleans()):
        unique = draw(st.text(alphabet="0123456789abcdef", min_size=16, max_size=32)).encode()
        tlvs = [(t, unique if t == proxyv2.PP2_TYPE_UNIQUE_ID else v) for t, v in tlvs]
    if draw(st.booleans()):
        token = bytearray(targets.genuine_token())
        position = draw(st.integers(0, len(token) - 1))
        token[position] = ord(draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")))
        tlvs = [(t, bytes(token) if t == targets.TLV_POLICY else v) for t, v in tlvs]
    order = draw(st.permutations(tlvs))
    extra = draw(st.lists(st.sampled_from(tlvs), max_size=2))
    try:
        wire = _header_wire(source, destination, list(order) + extra + [(proxyv2.PP2_TYPE_CRC32C, b"\0\0\0\0")])
    except (ValueError, proxyv2.InvalidProxyHeader):
        wire = targets.genuine_wire()
    return b"\x00" + wire


@st.composite
def feed_forgeries(draw):
    """
    The genuine feed with one character changed, its signature re-encoded
    with other padding bits, or claims signed by an untrusted key.
    """
    genuine = targets.genuine_feed()
    kind = draw(st.sampled_from(["char", "padding", "untrusted"]))
    if kind == "char":
        raw = bytearray(genuine)
        position = draw(st.integers(0, len(raw) - 1))
        raw[position] = ord(draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.= ")))
        return b"\x00" + bytes(raw)
    if kind == "padding":
        head, _, signature = genuine.rpartition(b".")
        # 64 bytes are 86 base64url characters whose last one carries 2
        # unused bits: another last character with the same top 4 bits
        # decodes to the same signature.
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(signature[-1:])
        bits = draw(st.integers(1, 3))
        changed = signature[:-1] + alphabet[(last & ~3) | bits : ((last & ~3) | bits) + 1]
        assert base64.urlsafe_b64decode(changed + b"==") == base64.urlsafe_b64decode(signature + b"==")
        return b"\x00" + head + b"." + changed
    key = Ed25519PrivateKey.generate()
    return b"\x00" + sign_feed(targets.FEED_CLAIMS, key, targets.FEED_KID)


_NASTY_VALUES = [
    '"127.0.0.1:\u00b2"',
    '"127.0.0.1:\u0669\u0660\u0660\u0661"',
    '"127.0.0.1:' + "9" * 5000 + '"',
    "1" + "0" * 400,
    '"' + "9" * 400 + 's"',
    '"keys/policy-1.pem\\u0000"',
    '"ssl:9901:privateKey=/etc/hostname"',
    '"a\\nb"',
    "[" * 1000 + "]" * 1000,
    "9" * 5000,
    "-1",
    "1e999",
    "nan",
    "inf",
    '""',
    "[]",
    "{}",
    'true',
    '"\U0001F600"',
    '"../../../../etc/passwd"',
]


@st.composite
def config_texts(draw):
    """The seed configuration with values replaced by hostile ones, or lines dropped or repeated."""
    lines = seeds.seeds()["config"]["full"].decode().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["value", "drop", "repeat", "key"]))
        line = lines[index]
        if action == "value" and "=" in line:
            key = line.split("=", 1)[0]
            value = draw(st.one_of(st.sampled_from(_NASTY_VALUES), st.text(max_size=40).map(repr)))
            lines[index] = f"{key}= {value}"
        elif action == "drop":
            del lines[index]
            if not lines:
                lines = [""]
        elif action == "repeat":
            lines.insert(index, line)
        else:
            key = draw(st.text(min_size=1, max_size=10))
            lines.insert(index, f'"{key}" = 1'.replace("\\", "\\\\"))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


_agent_words = st.sampled_from(
    ["up", "down", "fail", "stopped", "ready", "drain", "maint", "75%", "100%", "0%", "101%", "0.5", "1", "999",
     "1e3", "nan", "-1%", "50.%", "\u0661\u0660%", "#", "# note", ",", "\t", "\r", "\n", "\x00", "UP"]
)


def agent_lines():
    return st.lists(_agent_words, max_size=8).map(lambda words: " ".join(words).encode("utf-8"))


def target_strategy(target: str) -> tuple:
    """(the check, the strategy) the tests use for ``target``."""
    structured = {
        "verifier": (reframed_headers(), rebound_headers()),
        "feeds": (feed_forgeries(),),
        "config": (config_texts(),),
        "agent": (agent_lines(),),
    }.get(target, ())
    return targets.TARGETS[target], inputs(target, *structured)


def fuzz_target(target: str) -> int:
    """Fuzz ``target`` with its strategy for the profile's budget."""
    check, strategy = target_strategy(target)
    return fuzz_for_budget(strategy, check)


# ---------------------------------------------------------------------------
# The tests


class FuzzTargetTests(SynchronousTestCase):
    """Each target, for the profile's budget."""

    def test_clienthello(self):
        """The ClientHello parser raises only ClientHelloError and answers the same however the input is split."""
        fuzz_target("clienthello")

    def test_detect(self):
        """The preamble detector raises only IdentifyError, for every identify list."""
        fuzz_target("detect")

    def test_proxy(self):
        """The PROXY v1/v2 parser raises only InvalidProxyHeader and answers the same however the input is split."""
        fuzz_target("proxy")

    def test_verifier(self):
        """
        ShardVerifier raises only VerificationError and accepts only the
        header the proxy signed: not re-framed, not re-addressed, not with
        another connection id or an edited token.
        """
        fuzz_target("verifier")

    def test_feeds(self):
        """FeedValidator raises only FeedRejected and accepts no bytes but the signed feed's."""
        fuzz_target("feeds")

    def test_config(self):
        """load_config raises only ConfigError, in bounded time, one line per problem."""
        fuzz_target("config")

    def test_agent(self):
        """parse_agent_reply raises only AgentReplyError."""
        fuzz_target("agent")


def canonical(address: tuple) -> tuple:
    """
    An (ip, port) pair as an address object, so that two spellings of one
    IPv6 address compare equal (an IPv4-mapped address stays IPv6: the
    token binds the family the proxy signed).
    """
    return (ipaddress.ip_address(address[0]), address[1])


class SignedButWrongTests(SynchronousTestCase):
    """Tokens and feeds the trusted key did sign, for another connection or another time."""

    def test_token_bound_to_its_connection(self):
        """
        A token the trusted key signed for one (source, destination,
        shard, connection id) is accepted in a header only when the header
        carries exactly those, and then only once.
        """
        signer = PolicySigner(targets._FUZZ_KEY, kid=targets._KID, issuer="edge-fuzz", ttl=30, now=lambda: targets.NOW)
        policy = PolicyContext(encryption_level="tls", authentication_method=("none",), access_control_list=())
        ids = st.sampled_from([targets.CONNECTION_ID, "fedcba9876543210fedcba9876543210"])
        endpoints = st.sampled_from([targets.CLIENT, targets.PROXY_ADDRESS, ("203.0.113.7", 40001), ("::ffff:203.0.113.7", 40000)])

        def check(value):
            (signed_src, signed_dst, signed_id, audience), (src, dst, unique) = value
            if ipaddress.ip_address(src[0]).version != ipaddress.ip_address(dst[0]).version:
                return
            token = signer.sign(policy=policy, audience=audience, connection_id=signed_id, service="api",
                                source=signed_src, destination=signed_dst)
            wire = _header_wire(src, dst, [(proxyv2.PP2_TYPE_UNIQUE_ID, unique.encode()),
                                           (targets.TLV_POLICY, token), (proxyv2.PP2_TYPE_CRC32C, b"\0\0\0\0")])
            verifier = targets.fresh_verifier()
            matches = (canonical(signed_src), canonical(signed_dst), signed_id, audience) == (
                canonical(src), canonical(dst), unique, targets.SHARD)
            try:
                verified, _ = verifier.verify_bytes(wire)
            except VerificationError as e:
                self.assertFalse(matches, f"a matching header was refused: {e}")
                return
            self.assertTrue(matches, f"accepted {src}->{dst} {unique} for a token signed for "
                                     f"{signed_src}->{signed_dst} {signed_id} aud {audience}")
            self.assertEqual((canonical(verified.client), canonical(verified.destination)), (canonical(src), canonical(dst)))
            with self.assertRaises(VerificationError) as replay:
                verifier.verify_bytes(wire)
            self.assertEqual(replay.exception.reason, "replay")

        fuzz_for_budget(
            st.tuples(
                st.tuples(endpoints, endpoints, ids, st.sampled_from([targets.SHARD, "api-other-1"])),
                st.tuples(endpoints, endpoints, ids),
            ),
            check,
        )

    def test_feed_time_and_sequence(self):
        """
        A feed the trusted key signed is accepted exactly when it has not
        expired, was not issued more than the leeway ahead, and its seq is
        above the last accepted one of its issuer (or it is that very feed).
        """
        now = targets.NOW
        last_claims = dict(targets.FEED_CLAIMS, seq=100)
        last = targets.feed_validator().validate(sign_feed(last_claims, targets.feed_key(), targets.FEED_KID))

        def check(value):
            iat, lifetime, seq = value
            claims = dict(targets.FEED_CLAIMS, iat=iat, exp=iat + lifetime, seq=seq)
            raw = sign_feed(claims, targets.feed_key(), targets.FEED_KID)
            state = FeedState(None)
            state.record(last)
            validator = targets.feed_validator(now)
            validator.state = state
            expected = iat + lifetime > now and iat <= now + 60 and seq > 100
            try:
                validator.validate(raw)
            except FeedRejected as e:
                self.assertFalse(expected, f"refused a good feed: {e}")
            else:
                self.assertTrue(expected, f"accepted iat={iat} exp={iat + lifetime} seq={seq}")

        moments = st.integers(int(now) - 7200, int(now) + 7200)
        fuzz_for_budget(st.tuples(moments, st.integers(1, 7200), st.integers(0, 200)), check)


class CorpusTests(SynchronousTestCase):
    """The seed corpus in the repository."""

    def test_corpus_matches_seeds(self):
        """
        Every seed is a file in tests/fuzz/corpus/<target>/; those built
        without randomness (all but real ClientHellos) hold the very bytes
        seeds.py gives, so a change to a signed seed is seen.
        """
        for target, files in seeds.seeds().items():
            for name, data in files.items():
                path = os.path.join(seeds.CORPUS, target, name)
                with open(path, "rb") as f:
                    stored = f.read()
                if target == "clienthello" or (target, name) == ("detect", "sni"):
                    self.assertEqual(stored[:2], data[:2], path)
                else:
                    self.assertEqual(stored, data, path)

    def test_every_corpus_input_passes(self):
        """Every file of the corpus keeps its target's promises (a regression test for past findings)."""
        findings = []
        for target in targets.TARGETS:
            folder = os.path.join(seeds.CORPUS, target)
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            self.assertTrue(names, f"no corpus for {target}")
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                try:
                    targets.TARGETS[target](data)
                except BaseException as e:
                    findings.append(f"{target}/{name}: {type(e).__name__}: {str(e)[:200]}")
        self.assertEqual(findings, [], "\n".join(findings))

    def test_time_bound(self):
        """A target that runs past its bound fails with TookTooLong instead of hanging the run."""
        with self.assertRaises(targets.TookTooLong):
            with targets.within(0.05, "sleep"):
                time.sleep(1)
