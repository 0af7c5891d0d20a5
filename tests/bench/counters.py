"""The datapath counters the benchmark checks and reports, by name (``Counter.metric_name``).

Families come from the enum, so a counter added to ``meshaccel.agent.layout.Counter`` with one of
these prefixes is checked without a change here.
"""

from __future__ import annotations

from meshaccel.agent.layout import Counter


def _family(prefix: str) -> tuple[str, ...]:
    return tuple(c.metric_name for c in Counter if c.name.startswith(prefix))


#: Must never move in any measurement: a move invalidates it.
ERROR_COUNTERS = _family("COUNTER_ERROR_")
#: A direction of a connection went back to TCP for good: expected on tcp-bulk only.
FALLBACK_COUNTERS = _family("COUNTER_FALLBACK_")
MSG_REDIRECTED = Counter.COUNTER_MSG_REDIRECTED.metric_name
CONNECT_OUTBOUND_REDIRECTED = Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED.metric_name
#: The columns of results.md's "Fallbacks" table: what sk_msg delivered, why it stopped, and
#: the messages it passed to TCP because the peer is no redirect target (an app socket of a pod
#: that did not opt in).
FALLBACK_TABLE = (
    MSG_REDIRECTED,
    Counter.COUNTER_FALLBACK_BUDGET.metric_name,
    Counter.COUNTER_FALLBACK_RECEIVER_UNKNOWN.metric_name,
    Counter.COUNTER_FALLBACK_REDIRECT_FAILED.metric_name,
    Counter.COUNTER_MSG_PEER_NOT_TARGET.metric_name,
)
