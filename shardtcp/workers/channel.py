# -*- test-case-name: tests.workers.test_channel -*-
"""
The control channel between the supervisor and one worker: AMP over an
``AF_UNIX`` socket pair, one end kept by the supervisor, the other passed
to the worker as a file descriptor.

Worker to supervisor: ``Hello`` (who it is), ``Ready`` (it accepts on every
listener), ``Load`` (its open connections by shard, sent when they change,
at most every ``LOAD_INTERVAL``), ``Final`` (its last metrics, as it exits).  Supervisor to worker: ``PeerLoad`` (the
other workers' open connections by shard), ``Health``, ``Agent``,
``Admin`` (the live shard state the supervisor's health checks and admin
API decide), ``Retire`` (a reload replaced the worker), ``Metrics`` (the worker's
Prometheus text) and ``Status`` (a small JSON summary).

Both ends are ``GuardedAMP``: a message that does not parse, names no known
command or makes its responder fail is logged in one line, counted and
answered with an error (when it asks for an answer); the channel stays up.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

__all__ = [
    "Admin",
    "Agent",
    "BAD_MESSAGE",
    "Final",
    "GuardedAMP",
    "Health",
    "Hello",
    "Load",
    "LOAD_INTERVAL",
    "Metrics",
    "PeerLoad",
    "Ready",
    "Retire",
    "Status",
    "JSONArgument",
]

log = Logger(namespace="shardtcp.workers")

#: The shortest time between two ``Load`` messages of one worker (seconds).
LOAD_INTERVAL = 0.1

#: The error code answered to a message that was refused.
BAD_MESSAGE = b"BAD_MESSAGE"

#: The longest part of a refused message's problem that is logged.
_PROBLEM_CHARS = 200


class JSONArgument(amp.Argument):
    """A JSON value (at most AMP's 65,535 bytes)."""

    def toString(self, inObject) -> bytes:
        return json.dumps(inObject, separators=(",", ":"), sort_keys=True).encode("utf-8")

    def fromString(self, inString: bytes):
        return json.loads(inString.decode("utf-8"))


class BigText(amp.Argument):
    """Text of any length, split over as many AMP values as it takes."""

    _CHUNK = 60000

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        chunks = [data[i : i + self._CHUNK] for i in range(0, len(data), self._CHUNK)] or [b""]
        strings[name + b".n"] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode("ascii")] = chunk

    def fromBox(self, name, strings, objects, proto):
        count = int(strings[name + b".n"])
        data = b"".join(strings[name + b"." + str(i).encode("ascii")] for i in range(count))
        objects[name.decode("ascii")] = data.decode("utf-8")


class BigJSON(BigText):
    """A JSON value of any length (a worker's load over thousands of shards)."""

    def toBox(self, name, strings, objects, proto):
        value = {name.decode("ascii"): json.dumps(objects[name.decode("ascii")], separators=(",", ":"), sort_keys=True)}
        super().toBox(name, strings, value, proto)

    def fromBox(self, name, strings, objects, proto):
        super().fromBox(name, strings, objects, proto)
        key = name.decode("ascii")
        objects[key] = json.loads(objects[key])


class GuardedAMP(amp.AMP):
    """
    AMP whose bad messages are refused one at a time: AMP itself drops the
    connection on a message without answer that fails, and the channel's
    loss makes a worker drain and exit.  ``refused`` counts them; each one
    is logged in one line (the problem cut to 200 characters).
    """

    #: Who this end is, for the log line.
    side = "channel"

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if responder is None:
            return lambda box: self._refuse(box, name.decode("ascii", "replace")[:40], "unknown command")
        return responder

    def _wrapWithSerialization(self, aCallable, command):
        def guarded(box):
            try:
                arguments = command.parseArguments(box, self)
            except Exception as e:
                return self._refuse(box, command.__name__, f"does not parse: {e}")
            d = defer.maybeDeferred(aCallable, **arguments)
            d.addCallback(lambda objects: command.makeResponse(objects, self))
            d.addErrback(lambda f: self._refuse(box, command.__name__, f"failed: {f.getErrorMessage()}"))
            return d

        return guarded

    def _refuse(self, box, name: str, problem: str):
        self.refused += 1
        if len(problem) > _PROBLEM_CHARS:
            problem = problem[:_PROBLEM_CHARS] + "..."
        log.warn("{side}: message {command} refused: {problem}", side=self.side, command=name, problem=problem)
        if amp.ASK in box:
            return defer.fail(amp.RemoteAmpError(BAD_MESSAGE, f"{name} refused: {problem}"))
        return defer.succeed(amp.AmpBox())


class Hello(amp.Command):
    """A worker says who it is, once its channel is up."""

    arguments = [(b"index", amp.Integer()), (b"generation", amp.Integer()), (b"pid", amp.Integer())]
    response: list = []


class Ready(amp.Command):
    """A worker accepts connections on every listener now."""

    arguments: list = []
    response: list = []


class Load(amp.Command):
    """A worker's open connections by shard id (shards with none left out)."""

    arguments = [(b"counts", BigJSON())]
    response: list = []
    requiresAnswer = False


class PeerLoad(amp.Command):
    """The open connections of every other worker, summed by shard id."""

    arguments = [(b"counts", BigJSON())]
    response: list = []
    requiresAnswer = False


class Health(amp.Command):
    """A shard's health as the supervisor's checks see it (``Health`` value)."""

    arguments = [(b"shard_id", amp.Unicode()), (b"health", amp.Unicode())]
    response: list = []
    requiresAnswer = False


class Agent(amp.Command):
    """What a shard's agent said (``report`` null: forget it)."""

    arguments = [(b"shard_id", amp.Unicode()), (b"report", JSONArgument())]
    response: list = []
    requiresAnswer = False


class Admin(amp.Command):
    """
    An operator's change to a shard: ``what`` is ``state`` (value ``drain``,
    ``ready`` or null), ``weight`` (a number, or null: the record's) or
    ``security`` (a score, or null: the record's).
    """

    arguments = [(b"shard_id", amp.Unicode()), (b"what", amp.Unicode()), (b"value", JSONArgument())]
    response: list = []
    requiresAnswer = False


class Retire(amp.Command):
    """
    The worker's generation is replaced: stop accepting, let every open
    connection end by itself (no deadline: a reload never cuts an
    established connection), then exit.  SIGTERM still drains with
    ``drain_timeout``.
    """

    arguments: list = []
    response: list = []
    requiresAnswer = False


class Metrics(amp.Command):
    """The worker's metrics in the Prometheus text format."""

    arguments: list = []
    response = [(b"text", BigText())]


class Final(amp.Command):
    """
    A worker's metrics in the Prometheus text format as it exits (after its
    drain or retirement), so the supervisor keeps its counters.
    """

    arguments = [(b"text", BigText())]
    response: list = []


class Status(amp.Command):
    """The worker's summary: pid, open connections, listener counters."""

    arguments: list = []
    response = [(b"status", JSONArgument())]
