"""
Passive outlier detection: ejecting shards that keep failing connects.

The connection path reports every connect's outcome to the resolver
(``record_connect_result``). ``OutlierTracker`` keeps one shard's failure
streak and ejections, as a pure state machine driven by the caller's clock
readings, so that it can be tested and explained without a reactor.

The rules (``OutlierPolicy`` holds the numbers):

* ``consecutive_failures`` connect failures (refusals, timeouts, failed
  upstream TLS verifications) in a row eject the shard.
* The n-th ejection in a row lasts ``base_ejection · 2^(n-1)`` seconds, at
  most ``max_ejection`` (10 s, 20 s, 40 s ... 300 s by default).
* The streak survives the ejection: a shard coming back is on probation,
  and one more failure before a success ejects it again, for twice as long.
  A success ends the streak.
* A shard that stays in rotation ``reset_after`` seconds after its last
  ejection ended (the longest ejection, 300 s, by default) has earned a
  fresh start: its next ejection is a first one again.

Ejection never empties a service: the resolver's panic mode (see
``shardtcp.resolver.service``) routes among every non-draining shard when
fewer than ``panic_threshold`` of them are in rotation, as Envoy does.
"""

from __future__ import annotations

from typing import Optional

import attrs

from shardtcp.resolver.scoring import ejection_seconds


@attrs.frozen
class OutlierPolicy:
    """The numbers of passive outlier detection and of panic mode."""

    consecutive_failures: int = 3
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    reset_after: float = 300.0
    panic_threshold: float = 0.5

    def __attrs_post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if self.base_ejection < 0 or self.max_ejection < self.base_ejection:
            raise ValueError("need 0 <= base_ejection <= max_ejection")
        if not 0.0 <= self.panic_threshold <= 1.0:
            raise ValueError("panic_threshold must be within 0..1")


@attrs.define
class OutlierTracker:
    """
    One shard's failure streak and ejections.

    ``ejections`` counts the ejections in the current run (it drives the
    duration and goes back to zero after ``reset_after`` in rotation);
    ``total_ejections`` counts them all, for status pages.
    """

    consecutive: int = 0
    ejections: int = 0
    total_ejections: int = 0
    ejected_until: Optional[float] = None

    def ejected(self, now: float) -> bool:
        """Whether the shard is out of rotation at ``now``."""
        return self.ejected_until is not None and now < self.ejected_until

    def run_length(self, now: float, policy: OutlierPolicy) -> int:
        """
        The number of ejections in the current run as of ``now``: zero once
        the shard has been back ``reset_after`` seconds.
        """
        if (
            self.ejected_until is not None
            and not self.ejected(now)
            and now - self.ejected_until >= policy.reset_after
        ):
            return 0
        return self.ejections

    def record(self, ok: bool, now: float, policy: OutlierPolicy) -> Optional[float]:
        """
        Note one connect outcome; return the ejection's length in seconds
        when this failure starts an ejection, else None.
        """
        if ok:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if self.ejected(now) or self.consecutive < policy.consecutive_failures:
            return None
        self.ejections = self.run_length(now, policy) + 1
        self.total_ejections += 1
        duration = ejection_seconds(
            self.ejections, policy.base_ejection, policy.max_ejection
        )
        self.ejected_until = now + duration
        return duration
