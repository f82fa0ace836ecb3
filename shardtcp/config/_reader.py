# -*- test-case-name: tests.config.test_reader -*-
"""
Reading a configuration: bounded file reads, TOML decoding, and typed access
to TOML tables that records one problem line per bad value.

Every read of a file named by a configuration goes through ``read_file``
(regular files only, at most ``limit`` bytes), so that ``/dev/zero`` or a
FIFO can never hang ``check-config`` or start-up.  Every problem is one
line: key paths and values are escaped, and messages taken from other
libraries are folded onto one line.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
import tomllib
from typing import Any, Iterator, Optional, Sequence

from shardtcp.model import IPNetwork, Location
from shardtcp.net import parse_network

#: The largest configuration file read, and the largest file it names.
MAX_CONFIG_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 20

#: The longest duration accepted anywhere: a year.
MAX_DURATION = 366 * 86400.0


class ConfigError(Exception):
    """
    A configuration could not be used; ``problems`` lists every reason found,
    each as ``"key.path: message"`` on one line.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = [one_line(p) for p in problems]
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


# ---------------------------------------------------------------------------
# One line per problem

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with line breaks folded to spaces and other controls escaped."""
    text = re.sub(r"\s*[\r\n\u0085\u2028\u2029]+\s*", " ", str(text)).strip()
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def show(value: Any) -> str:
    """A short one-line rendering of a configuration value for a message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


#: A bare TOML key (compiled once: every value read names its key).
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key(name: str) -> str:
    """A key as it would be written in TOML (a quoted, escaped string unless bare)."""
    if _BARE_KEY.fullmatch(name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped)
    if len(escaped) > 60:
        escaped = escaped[:57] + "..."
    return f'"{escaped}"'


def _outside(
    value: float, minimum: Optional[float], maximum: Optional[float], positive: bool
) -> bool:
    """Whether ``Reader._in_range`` would refuse ``value`` (checked before any message is made)."""
    return (
        (positive and value <= 0)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    )


def join(path: str, name: str) -> str:
    return f"{path}.{key(name)}" if path else key(name)


def choices(values: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


# ---------------------------------------------------------------------------
# Files


class FileProblem(Exception):
    """
    A file named by the configuration cannot be used: the message names the
    file, ``reason`` does not; both are one line.
    """

    def __init__(self, filename: str, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(message or f"{filename}: {reason}")


def read_file(filename: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """
    The content of the regular file ``filename``, at most ``limit`` bytes.

    Devices, FIFOs and folders are refused before anything is read (opening
    does not block: ``O_NONBLOCK``).  Raises ``FileProblem``.
    """
    if "\x00" in filename:
        raise FileProblem(filename, "the path contains a NUL byte", "the path contains a NUL byte")
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        reason = e.strerror or str(e)
        raise FileProblem(filename, f"cannot read: {reason}", f"cannot read {filename}: {reason}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileProblem(filename, "cannot read: Is a directory", f"cannot read {filename}: Is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(filename, "not a regular file", f"{filename} is not a regular file")
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(filename, f"larger than {limit} bytes", f"{filename} is larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        reason = e.strerror or str(e)
        raise FileProblem(filename, f"cannot read: {reason}", f"cannot read {filename}: {reason}") from None
    finally:
        os.close(fd)


_SYNTAX_POSITION = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)")


def read_document(path: str) -> dict:
    """
    The TOML document at ``path``, decoded.  Raises ``ConfigError`` with one
    problem ``"PATH: ..."`` when it cannot be read or decoded; TOML syntax
    errors say ``"PATH: line L, column C: message"``.
    """
    try:
        raw = read_file(path, MAX_CONFIG_BYTES)
    except FileProblem as e:
        raise ConfigError([f"{path}: {e.reason}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    return decode_toml(path, text)


def decode_toml(path: str, text: str) -> dict:
    """``text`` decoded as TOML; any failure is one ``ConfigError`` problem."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_problem(path, text, e)]) from None
    except RecursionError:
        raise ConfigError([f"{path}: arrays or tables are nested too deeply"]) from None
    except ValueError as e:
        # An integer beyond Python's digit limit for str -> int.
        raise ConfigError([f"{path}: a value cannot be read: {e}"]) from None


def _syntax_problem(path: str, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    match = _SYNTAX_POSITION.fullmatch(message)
    if match is None:
        return f"{path}: {message}"
    if match.group(2) is not None:
        line, column = int(match.group(2)), int(match.group(3))
    else:
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    return f"{path}: line {line}, column {column}: {match.group(1)}"


# ---------------------------------------------------------------------------
# Durations

_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """
    Convert a duration such as ``"250ms"``, ``"5s"``, ``"1.5s"``, ``"2m"`` or
    ``"1h"`` to seconds.

    Bare numbers (``30``, ``"30"``) are refused so that a unit is never
    guessed; so are negative values and anything longer than a year.
    Raises ``ValueError`` with a one-line message.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a duration string like "30s", got {show(text)}')
    match = _DURATION.fullmatch(text) if len(text) <= 32 else None
    if match is None:
        raise ValueError(
            'expected a duration like "250ms", "5s", "2m" or "1h", '
            f"got {show(text)}"
        )
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most a year (8784h), got {show(text)}")
    return seconds


# ---------------------------------------------------------------------------
# The reader: typed access to TOML tables that records problems


class Reader:
    """
    Reads values out of TOML tables, recording a problem for each bad one.

    Every getter takes the table, the table's key path and the key, and
    returns the value converted (or ``default`` when it is absent or bad), so
    that reading can go on and find further problems.
    """

    def __init__(self, base_dir: str, check_files: bool) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        message = one_line(message)
        self.problems.append(f"{path}: {message}" if path else message)

    # -- structure ---------------------------------------------------------

    def table(self, path: str, value: Any, known: Sequence[str]) -> Optional[dict]:
        """``value`` if it is a table; unknown keys in it are reported."""
        if not isinstance(value, dict):
            self.add(path, f"expected a table, got {show(value)}")
            return None
        for name in value:
            if name not in known:
                message = "unknown key"
                close = difflib.get_close_matches(str(name), list(known), n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                self.add(join(path, str(name)), message)
        return value

    def sub_table(
        self, table: dict, path: str, name: str, known: Sequence[str]
    ) -> Optional[dict]:
        """The table under ``name``, or None when absent or not a table."""
        if name not in table:
            return None
        return self.table(join(path, name), table[name], known)

    def array_of_tables(
        self, table: dict, path: str, name: str, known: Sequence[str]
    ) -> Iterator[tuple[str, dict]]:
        """Yield ``(path, table)`` for each entry of the array under ``name``."""
        if name not in table:
            return
        here = join(path, name)
        value = table[name]
        if not isinstance(value, (list, tuple)):
            self.add(here, f"expected an array of tables ([[{here}]]), got {show(value)}")
            return
        for index, entry in enumerate(value):
            entry_path = f"{here}[{index}]"
            checked = self.table(entry_path, entry, known)
            if checked is not None:
                yield entry_path, checked

    # -- scalars -----------------------------------------------------------

    def _present(self, table: dict, path: str, name: str, required: bool) -> bool:
        if name in table:
            return True
        if required:
            self.add(join(path, name), "required")
        return False

    def string(
        self,
        table: dict,
        path: str,
        name: str,
        default: Any = None,
        *,
        required: bool = False,
        nonempty: bool = True,
    ) -> Any:
        if not self._present(table, path, name, required):
            return default
        value = table[name]
        if not isinstance(value, str):
            self.add(join(path, name), f"expected a string, got {show(value)}")
            return default
        if nonempty and not value:
            self.add(join(path, name), "must not be empty")
            return default
        return value

    def boolean(self, table: dict, path: str, name: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            self.add(join(path, name), f"expected true or false, got {show(value)}")
            return default
        return value

    def integer(
        self,
        table: dict,
        path: str,
        name: str,
        default: Any,
        *,
        minimum: Optional[int] = None,
        maximum: Optional[int] = None,
        required: bool = False,
    ) -> Any:
        if not self._present(table, path, name, required):
            return default
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(join(path, name), f"expected an integer, got {show(value)}")
            return default
        if _outside(value, minimum, maximum, False):
            self._in_range(join(path, name), value, minimum, maximum, False)
            return default
        return value

    def number(
        self,
        table: dict,
        path: str,
        name: str,
        default: Any,
        *,
        minimum: Optional[float] = None,
        maximum: Optional[float] = None,
        positive: bool = False,
        required: bool = False,
    ) -> Any:
        if not self._present(table, path, name, required):
            return default
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(join(path, name), f"expected a number, got {show(value)}")
            return default
        # An integer of hundreds of digits has no float: compare it as an
        # integer, never convert it.
        if isinstance(value, int) and abs(value) > 10**15:
            self.add(join(path, name), f"expected a number of at most 15 digits, got {show(value)}")
            return default
        if not math.isfinite(value):
            self.add(join(path, name), f"expected a finite number, got {show(value)}")
            return default
        if _outside(value, minimum, maximum, positive):
            self._in_range(join(path, name), value, minimum, maximum, positive)
            return default
        return float(value)

    def _in_range(
        self,
        path: str,
        value: float,
        minimum: Optional[float],
        maximum: Optional[float],
        positive: bool,
    ) -> bool:
        if positive and value <= 0:
            self.add(path, f"must be greater than 0, got {show(value)}")
            return False
        if minimum is not None and maximum is not None:
            if not minimum <= value <= maximum:
                self.add(path, f"must be between {minimum} and {maximum}, got {show(value)}")
                return False
        elif minimum is not None and value < minimum:
            self.add(path, f"must be at least {minimum}, got {show(value)}")
            return False
        elif maximum is not None and value > maximum:
            self.add(path, f"must be at most {maximum}, got {show(value)}")
            return False
        return True

    def duration(
        self,
        table: dict,
        path: str,
        name: str,
        default: float,
        *,
        positive: bool = False,
        maximum: Optional[float] = None,
    ) -> float:
        if name not in table:
            return default
        here = join(path, name)
        try:
            seconds = parse_duration(table[name])
        except ValueError as e:
            self.add(here, str(e))
            return default
        if positive and seconds <= 0:
            self.add(here, f"must be longer than 0s, got {show(table[name])}")
            return default
        if maximum is not None and seconds > maximum:
            self.add(here, f"must be at most {maximum:g}s, got {show(table[name])}")
            return default
        return seconds

    def choice(
        self, table: dict, path: str, name: str, values: Sequence[str], default: Any,
        *, required: bool = False,
    ) -> Any:
        if not self._present(table, path, name, required):
            return default
        value = table[name]
        if not isinstance(value, str) or value not in values:
            self.add(join(path, name), f"expected one of {choices(values)}, got {show(value)}")
            return default
        return value

    # -- lists -------------------------------------------------------------

    def string_list(self, table: dict, path: str, name: str) -> Optional[list[tuple[str, str]]]:
        """``[(item_path, string), ...]`` for the list under ``name``, or None."""
        if name not in table:
            return None
        here = join(path, name)
        value = table[name]
        if not isinstance(value, (list, tuple)):
            self.add(here, f"expected a list of strings, got {show(value)}")
            return None
        items = []
        for index, item in enumerate(value):
            item_path = f"{here}[{index}]"
            if not isinstance(item, str):
                self.add(item_path, f"expected a string, got {show(item)}")
            elif not item:
                self.add(item_path, "must not be empty")
            else:
                items.append((item_path, item))
        return items

    def networks(self, table: dict, path: str, name: str) -> Optional[tuple]:
        """The CIDR list under ``name`` as networks, or None if absent."""
        items = self.string_list(table, path, name)
        if items is None:
            return None
        return tuple(
            network
            for item_path, text in items
            if (network := self.network(item_path, text)) is not None
        )

    def network(self, path: str, text: Any) -> Optional[IPNetwork]:
        if not isinstance(text, str):
            self.add(path, f"expected a CIDR string like \"10.0.0.0/8\", got {show(text)}")
            return None
        try:
            return parse_network(text)
        except ValueError as e:
            # parse_network's messages start with the value itself.
            self.add(path, f"not a valid network {e}")
            return None

    # -- files -------------------------------------------------------------

    def path(
        self,
        table: dict,
        path: str,
        name: str,
        *,
        required: bool = False,
        readable: bool = True,
    ) -> Optional[str]:
        """
        The absolute path under ``name``; when ``readable`` and files are
        checked, the file must be a readable regular file of bounded size.
        """
        value = self.string(table, path, name, required=required)
        if value is None:
            return None
        if "\x00" in value:
            self.add(join(path, name), "the path contains a NUL byte")
            return None
        absolute = self.absolute(value)
        if readable:
            self.readable(join(path, name), absolute)
        return absolute

    def absolute(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def readable(self, path: str, filename: str) -> bool:
        """Report when ``filename`` cannot be read (only when checking files)."""
        if not self.check_files:
            return True
        try:
            read_file(filename)
        except FileProblem as e:
            self.add(path, str(e))
            return False
        return True

    def location(self, table: dict, path: str, name: str) -> Optional[Location]:
        here = join(path, name)
        location = self.sub_table(table, path, name, ("lat", "lon", "region"))
        if location is None:
            return None
        return self.location_fields(location, here)

    def location_fields(self, table: dict, path: str) -> Location:
        lat = self.number(table, path, "lat", 0.0, minimum=-90, maximum=90, required=True)
        lon = self.number(table, path, "lon", 0.0, minimum=-180, maximum=180, required=True)
        region = self.string(table, path, "region", "", nonempty=False)
        return Location(lat=lat, lon=lon, region=region)
