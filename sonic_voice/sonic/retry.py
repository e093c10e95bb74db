"""When to try the Bedrock stream again, and when to stop: one policy for opening,
rotating and recovering.

Why one object: the session used to count attempts only inside "open a stream", so a
stream that opened and then died (internalServerException after 3 audio frames) reset the
count at each recovery; against a service failing every new stream the session opened
118 streams in 12 s and never stopped (issue 11). Here every failure counts, whether the
open failed or a stream that opened then died, and the count is cleared only by evidence
of health: a stream that stayed up ``healthy_after_s`` or completed a turn.

Delays (``base_s`` = 0.5 s, ``cap_s`` = 10 s by default), jittered to 50-100 % so many
robots behind one NAT do not reconnect in step:

- first failure after a healthy stream: reconnect at once (an 8-minute timeout or a one-off
  stream error should cost the visitor nothing);
- then ``base_s * 2**(n-2)``: 0.5, 1, 2, 4, 8, 10, 10 s...;
- throttling starts at ``throttle_base_s`` (1 s) and doubles too: 1, 2, 4, 8, 10 s.

After ``budget`` retries (the session's ``max_retries``) the next consecutive failure stops
the session with a message naming the count, the time spent and the last cause. With the
defaults (5) that is about 8-16 s of trying with at most 6 streams opened (measured in
test_sonic_storm.py against a stand-in failing every new stream).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter over consecutive failures, with a budget."""

    budget: int = 5  # retries: failure number budget + 1 is answered "stop"
    base_s: float = 0.5
    cap_s: float = 10.0
    throttle_base_s: float = 1.0
    healthy_after_s: float = 30.0
    jitter: float = 0.5  # each delay is drawn from [(1 - jitter) * d, d]
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: int = 0
    first_failure_at: float = 0.0
    last_cause: str = ""

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError("retry budget must be >= 0")
        if self.base_s < 0 or self.cap_s < 0 or self.throttle_base_s < 0:
            raise ValueError("retry delays must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("retry jitter must be in [0, 1]")

    def delay_for(self, n: int, throttled: bool) -> float:
        """The un-jittered delay before attempt ``n + 1`` after ``n`` consecutive failures."""
        if throttled:
            d = self.throttle_base_s * 2.0 ** (n - 1)
        elif n <= 1:
            d = 0.0
        else:
            d = self.base_s * 2.0 ** (n - 2)
        return min(self.cap_s, d)

    def failure(self, cause: str, throttled: bool = False) -> float | None:
        """Count one failure; the delay before trying again, or None when the budget is spent."""
        if self.failures == 0:
            self.first_failure_at = time.monotonic()
        self.failures += 1
        self.last_cause = cause
        if self.failures > self.budget:
            return None
        d = self.delay_for(self.failures, throttled)
        return d * (1.0 - self.jitter * self.rng.random())

    def healthy(self) -> None:
        """A stream proved healthy (up long enough, or a completed turn): start over."""
        self.failures = 0
        self.last_cause = ""

    def seen_alive(self, seconds: float) -> None:
        """A stream ended after ``seconds``: long enough counts as health."""
        if seconds >= self.healthy_after_s:
            self.healthy()

    def fatal_message(self) -> str:
        spent = time.monotonic() - self.first_failure_at if self.failures else 0.0
        return (
            f"Nova Sonic unavailable: gave up after {self.failures} consecutive failures "
            f"in {spent:.1f} s; last: {self.last_cause}"
        )
