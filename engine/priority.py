"""Request classes in the engine: the order sequences are served in, aging, and who may preempt whom.

Classes are ``Sequence.priority`` (an int, higher is served first; the router's batch jobs use
``BATCH_PRIORITY``, below every interactive class).

Order: by *effective priority*, then arrival. A sequence's effective priority is
``priority + age / aging_s``, its age being the time since it arrived (monotonic clock). Every sequence ages
at the same rate, so whether A ranks ahead of B never changes while both wait: comparing
``pA + (now - tA) / aging_s`` with ``pB + (now - tB) / aging_s`` is comparing ``pA - tA / aging_s`` with
``pB - tB / aging_s``. The rank is therefore a fixed key computed once (``rank_key``), the queue stays a heap,
and a preempted sequence returns to the queue with its original key (its place).

Starvation bound (the aging rule): a sequence of priority ``p`` that arrived at ``t`` ranks ahead of every
sequence arriving after ``t + aging_s * (P - p)`` with priority at most ``P``. So once ``aging_s * (P - p)``
seconds have passed, no new arrival of class ``P`` or below can get ahead of it: it waits only for the
finite set that already ranks ahead, and takes the next free blocks and batch slot after them (the waiting
queue is head-of-line: nothing behind it is admitted first). With the default 30 s and classes 0 and 10,
a class-0 request is overtaken by class-10 arrivals for at most 300 s. ``aging_s = 0`` turns aging off:
strict priority, then arrival, and a low class may starve under a steady stream of higher ones.

Preemption (by recompute, see engine.scheduler): a waiting sequence preempts the last-ranked running one
only when it ranks ahead of it *and* its class is strictly higher. Equal classes never preempt each other
(first come, first served within a class: no thrashing), and an old low-class request that aged past a
fresh high-class one is admitted next but never evicts it. Because the rank of two sequences never flips,
a request is never preempted by one it previously preempted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free leaf: the router reads BATCH_PRIORITY
    from pdserve.engine.sequence import Sequence

DEFAULT_AGING_S = 30.0
BATCH_PRIORITY = -10  # the router's batch jobs: below every interactive class


def rank_key(seq: Sequence, aging_s: float) -> tuple[float, int]:
    """Smaller is served first: (aged priority, negated; arrival order)."""
    if aging_s <= 0:
        return (-seq.priority, seq.arrival_seq)
    return (seq.arrival_time / aging_s - seq.priority, seq.arrival_seq)


def may_preempt(arrival: Sequence, victim: Sequence, aging_s: float) -> bool:
    """Whether the waiting ``arrival`` may take the running ``victim``'s blocks (see the module docstring)."""
    return victim.priority < arrival.priority and rank_key(victim, aging_s) > rank_key(arrival, aging_s)
