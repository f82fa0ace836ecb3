"""
The agent-check reply: what a shard's agent says about itself, in one line.

A shard whose ``health_check`` has ``kind = "agent"`` runs a small text
service on ``agent_port``. The proxy connects, sends nothing (no PROXY
header either: the agent is not the shard's application port), and reads
one line of at most 128 bytes, ended by a newline or by the agent closing
the connection, within the check's ``timeout``. This module parses that
line; it is pure (no sockets, no clock) so the format is tested on its own.

The format
==========

Words separated by spaces, tabs or commas, case-insensitive; anything after
a ``#`` is a free-text description (logged and shown, never parsed)::

    up 37%
    drain
    down # disk full
    weight 50
    up, ready, 80%, weight 75%

==================  ==========================================================
word                meaning
==================  ==========================================================
``up``              the shard is alive (the check passes)
``down``            the shard says it is not working: it is unhealthy at once,
``fail``            without waiting for ``fall`` checks (an explicit statement
``stopped``         is not noise); it needs ``rise`` passing checks to return
``ready``           take new connections again (ends ``drain``/``maint``)
``drain``           take no new connections, keep the existing ones
``maint``           the same as ``drain`` for shardtcp (no new connections)
``NN%``             the shard's own load, 0 to 100 %: this proxy counts the
                    shard as ``max(its own open connections / capacity, NN%)``
``weight NN``       the shard's weight as a percentage of the configured one,
``weight NN%``      0 to 100; above 100 is read as 100 (an agent can lower its
                    shard's share, never raise it)
==================  ==========================================================

At most one of up/down/fail/stopped and at most one of ready/drain/maint
may appear; a reply without up/down/fail/stopped counts as ``up`` (the
agent answered). ``ready``/``drain``/``maint`` and ``weight`` stay in force
until a later reply changes them, as in HAProxy; a load report is a
snapshot: a reply without ``NN%`` withdraws the previous one. A reply that
is empty, too long, not ASCII, or holds a word not listed above is a failed
check (a half-understood agent is not trusted to be up).

Differences from HAProxy's agent-check: there a bare ``NN%`` sets the
weight; here it is the shard's load, and the weight is set with the
explicit ``weight NN`` (HAProxy has no load report, and mixing the two in
one word would let a shard that means "I am 37 % busy" cut its own weight
to 37 %).
"""

from __future__ import annotations

import re
from typing import Optional, Union

import attrs

#: Longest reply accepted, newline included.
MAX_REPLY = 128

_OPERATIONAL = ("up", "down", "fail", "stopped")
_ADMINISTRATIVE = ("ready", "drain", "maint")
_DOWN = ("down", "fail", "stopped")
_PERCENT = re.compile(r"^(\d{1,3}(?:\.\d+)?)%$")
_NUMBER = re.compile(r"^(\d{1,3}(?:\.\d+)?)%?$")
_SEPARATORS = re.compile(r"[ \t,]+")


class AgentReplyError(ValueError):
    """The agent's line does not follow the format; ``str()`` says why."""


@attrs.frozen
class AgentReport:
    """
    One parsed agent reply.

    ``operational`` is up/down/fail/stopped (``up`` when the reply named
    none), ``administrative`` ready/drain/maint or None (unchanged),
    ``load`` the reported load in 0..1 or None, ``weight_percent`` 0..100 or
    None (unchanged), ``description`` the text after ``#``.
    """

    operational: str = "up"
    administrative: Optional[str] = None
    load: Optional[float] = None
    weight_percent: Optional[float] = None
    description: str = ""

    @property
    def alive(self) -> bool:
        """Whether the reply lets the check pass (not down/fail/stopped)."""
        return self.operational not in _DOWN


def parse_agent_reply(line: Union[bytes, str]) -> AgentReport:
    """
    Parse one agent line (its trailing CR/LF optional); raise
    ``AgentReplyError`` when it breaks the format.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_REPLY:
            raise AgentReplyError(f"reply longer than {MAX_REPLY} bytes")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise AgentReplyError("reply is not ASCII") from None
    else:
        text = line
        if len(text) > MAX_REPLY:
            raise AgentReplyError(f"reply longer than {MAX_REPLY} bytes")
        if not text.isascii():
            raise AgentReplyError("reply is not ASCII")
    text = text.rstrip("\r\n")
    if "\n" in text or "\r" in text:
        raise AgentReplyError("reply holds more than one line")
    words_text, _, description = text.partition("#")
    words = [w.lower() for w in _SEPARATORS.split(words_text.strip()) if w]
    if not words:
        raise AgentReplyError("empty reply")
    operational: Optional[str] = None
    administrative: Optional[str] = None
    load: Optional[float] = None
    weight: Optional[float] = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in _OPERATIONAL:
            if operational is not None:
                raise AgentReplyError(f"both {operational!r} and {word!r}")
            operational = word
        elif word in _ADMINISTRATIVE:
            if administrative is not None:
                raise AgentReplyError(f"both {administrative!r} and {word!r}")
            administrative = word
        elif word == "weight":
            if weight is not None:
                raise AgentReplyError("weight given twice")
            if i + 1 >= len(words):
                raise AgentReplyError("weight without a number")
            match = _NUMBER.match(words[i + 1])
            if match is None:
                raise AgentReplyError(f"weight {words[i + 1]!r} is not a number")
            weight = min(100.0, float(match.group(1)))
            i += 1
        else:
            match = _PERCENT.match(word)
            if match is None:
                raise AgentReplyError(f"unknown word {word!r}")
            if load is not None:
                raise AgentReplyError("load given twice")
            value = float(match.group(1))
            if value > 100.0:
                raise AgentReplyError(f"load {word} is above 100%")
            load = value / 100.0
        i += 1
    return AgentReport(
        operational=operational or "up",
        administrative=administrative,
        load=load,
        weight_percent=weight,
        description=description.strip(),
    )
