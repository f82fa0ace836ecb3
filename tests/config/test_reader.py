"""
Tests for ``shardtcp.config._reader`` through the public face of
``shardtcp.config``: bounded file reads, TOML that cannot be decoded, numbers
and durations out of range, and one line per problem.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from shardtcp.config import (
    ConfigError,
    FileProblem,
    load_config,
    parse_config,
    parse_duration,
    read_file,
)
from tests.config.test_sections import MINIMAL_TOML, minimal, no_size


class _Folder:
    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def problems(self, data: dict, check_files: bool = False) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, self.folder(), check_files=check_files, token_size=no_size)
        return caught.exception.problems


class ReadFileTests(_Folder, SynchronousTestCase):
    """Every file a configuration names is read with a bound."""

    def test_regular_file(self) -> None:
        """A small regular file is read whole."""
        path = os.path.join(self.folder(), "f")
        with open(path, "wb") as f:
            f.write(b"abc")
        self.assertEqual(read_file(path), b"abc")

    def test_too_large(self) -> None:
        """A file over the limit is refused after reading at most limit + 1 bytes."""
        path = os.path.join(self.folder(), "f")
        with open(path, "wb") as f:
            f.write(b"x" * 11)
        self.assertEqual(read_file(path, 11), b"x" * 11)
        with self.assertRaises(FileProblem) as caught:
            read_file(path, 10)
        self.assertIn("larger than 10 bytes", str(caught.exception))

    def test_devices_and_fifos(self) -> None:
        """/dev/zero and a FIFO without a writer are refused at once, not read forever."""
        with self.assertRaises(FileProblem) as caught:
            read_file("/dev/zero")
        self.assertEqual(str(caught.exception), "/dev/zero is not a regular file")
        fifo = os.path.join(self.folder(), "fifo")
        os.mkfifo(fifo)
        with self.assertRaises(FileProblem):
            read_file(fifo)

    def test_nul_byte(self) -> None:
        """A path with a NUL byte is a problem, not ValueError."""
        with self.assertRaises(FileProblem) as caught:
            read_file("a\x00b")
        self.assertIn("NUL byte", str(caught.exception))

    def test_private_key_dev_zero(self) -> None:
        """signing.private_key = "/dev/zero" is one problem line; the read does not hang."""
        data = minimal()
        data["signing"]["private_key"] = "/dev/zero"
        problems = self.problems(data, check_files=True)
        self.assertIn("signing.private_key: /dev/zero is not a regular file", problems)

    def test_large_config_file(self) -> None:
        """A configuration file over 1 MiB is one problem."""
        path = os.path.join(self.folder(), "big.toml")
        with open(path, "w") as f:
            f.write("# " + "x" * (1 << 20) + "\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(caught.exception.problems, [f"{path}: larger than 1048576 bytes"])

    def test_config_file_is_dev_zero(self) -> None:
        """load_config("/dev/zero") answers at once."""
        with self.assertRaises(ConfigError) as caught:
            load_config("/dev/zero")
        self.assertEqual(caught.exception.problems, ["/dev/zero: not a regular file"])


class NulPathTests(_Folder, SynchronousTestCase):
    """A NUL byte in any path is a problem line naming the key."""

    def test_paths(self) -> None:
        """token_file, private_key, state_file and a feed source."""
        data = minimal()
        data["signing"]["private_key"] = "keys/\x00.pem"
        data["admin"] = {"listen": "tcp:0", "token_file": "tok\x00en"}
        data["threat_intel"] = {
            "trusted_keys": "k.json",
            "state_file": "state/\x00",
            "feeds": [{"source": "feeds/\x00.jws"}],
        }
        for check_files in (False, True):
            problems = self.problems(data, check_files=check_files)
            for path in (
                "signing.private_key",
                "admin.token_file",
                "threat_intel.state_file",
                "threat_intel.feeds[0].source",
            ):
                self.assertIn(f"{path}: the path contains a NUL byte", problems)


class TomlTests(_Folder, SynchronousTestCase):
    """What tomllib cannot decode is one problem, never an exception."""

    def load(self, text: str) -> list[str]:
        path = os.path.join(self.folder(), "c.toml")
        with open(path, "w") as f:
            f.write(text)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        [problem] = caught.exception.problems
        self.assertTrue(problem.startswith(path + ": "), problem)
        return problem

    def test_deep_nesting(self) -> None:
        """1,000 nested arrays (RecursionError in tomllib) are one problem."""
        problem = self.load("a = " + "[" * 1000 + "]" * 1000 + "\n")
        self.assertIn("nested too deeply", problem)

    def test_huge_integer(self) -> None:
        """A 5,000-digit integer (ValueError in tomllib) is one problem."""
        problem = self.load("[proxy]\nid = " + "9" * 5000 + "\n")
        self.assertIn("cannot be read", problem)


class NumberTests(_Folder, SynchronousTestCase):
    """Numbers that have no float, or no finite one."""

    def test_huge_integers(self) -> None:
        """security_score, lat and weights of 1 followed by 400 zeros: a line each."""
        data = minimal()
        shard = data["service"]["api"]["shard"][0]
        shard["security_score"] = 10**400
        shard["location"] = {"lat": 10**400, "lon": -(10**400)}
        data["service"]["api"]["weights"] = {"latency": 10**400}
        problems = self.problems(data)
        for path in (
            "service.api.shard[0].security_score",
            "service.api.shard[0].location.lat",
            "service.api.shard[0].location.lon",
            "service.api.weights.latency",
        ):
            self.assertIn(
                f"{path}: expected a number of at most 15 digits, got an integer of 401 digits",
                problems,
            )

    def test_edges(self) -> None:
        """15 digits are a number (then range-checked); 16 are not; 1e400 is not finite."""
        data = minimal()
        data["service"]["api"]["weights"] = {"latency": 10**15}
        config = parse_config(data, self.folder(), check_files=False, token_size=no_size)
        self.assertEqual(config.services[0].weights.latency, 1e15)
        data["service"]["api"]["weights"] = {"latency": 10**15 + 1}
        self.assertIn("15 digits", self.problems(data)[0])
        data["service"]["api"]["weights"] = {"latency": float("1e400")}
        self.assertEqual(
            self.problems(data), ["service.api.weights.latency: expected a finite number, got inf"]
        )


class DurationTests(SynchronousTestCase):
    """Durations are bounded: no digits without end, nothing over a year."""

    def test_long_digits(self) -> None:
        """A 400-digit duration (which float() makes inf) is refused."""
        with self.assertRaises(ValueError):
            parse_duration("9" * 400 + "s")
        with self.assertRaises(ValueError):
            parse_duration("1" + "0" * 400 + "ms")

    def test_year_bound(self) -> None:
        """8784h (366 days) is the longest duration; a second more is refused."""
        self.assertEqual(parse_duration("8784h"), 366 * 86400.0)
        self.assertEqual(parse_duration("31622400s"), 366 * 86400.0)
        with self.assertRaises(ValueError) as caught:
            parse_duration("31622401s")
        self.assertIn("at most a year", str(caught.exception))

    def test_in_a_file(self) -> None:
        """An endless slow_start is one problem at its key path."""
        data = minimal()
        data["service"]["api"]["shard"][0]["slow_start"] = "9" * 400 + "s"
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with self.assertRaises(ConfigError) as caught:
            parse_config(data, folder, check_files=False, token_size=no_size)
        [problem] = caught.exception.problems
        self.assertTrue(problem.startswith("service.api.shard[0].slow_start: "), problem)


class OneLineTests(_Folder, SynchronousTestCase):
    """Every problem is exactly one line."""

    def test_key_with_newline(self) -> None:
        """An unknown key holding a newline is escaped in its key path."""
        data = minimal()
        data["listener"][0]["bad\nkey"] = 1
        data["service"]["api\nx"] = {"names": ["x.test"]}
        problems = self.problems(data)
        self.assertIn('listener[0]."bad\\u000akey": unknown key', problems)
        for problem in problems:
            self.assertNotIn("\n", problem)
            self.assertNotIn("\r", problem)

    def test_config_error_folds_lines(self) -> None:
        """ConfigError folds any multi-line message it is given onto one line."""
        error = ConfigError(["a.b: first\n  second\r\nthird"])
        self.assertEqual(error.problems, ["a.b: first second third"])
        self.assertEqual(str(error), "a.b: first second third")

    def test_text_file_still_loads(self) -> None:
        """The bounded reader loads an ordinary file as before."""
        folder = self.folder()
        path = os.path.join(folder, "c.toml")
        with open(path, "w") as f:
            f.write(MINIMAL_TOML)
        self.assertEqual(load_config(path, check_files=False).proxy.id, "edge-1")
