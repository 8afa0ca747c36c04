"""When a request began, for the latency the edge records: at the proxy in front, where there is one.

HAProxy (Ray Serve's HAProxy mode, as `recserve serve` runs it) stamps each request it forwards with
`X-Request-Start: t=<microseconds since the epoch>` (pipeline/serve/haproxy_wrapper.sh), the convention of Heroku's
router and of New Relic's and Datadog's "request queueing" (HAProxy's clock when its frontend rules ran, after the
whole request arrived: `option http-buffer-request`). The edge starts its clock that much earlier, so
recserve_request_latency_ms and `Server-Timing` hold the wait behind HAProxy (its queue, the hop, the replica's
socket and event loop) that a client waits too, not only the ingress's own work.

HAProxy replaces any value a client sent. A replica reached without it (its own port, Serve's backup proxy) may get
a client's value: one that is not a plain `t=` number, lies in the future or more than MAX_PROXY_WAIT_MS in the past
(another node's clock, a forged header) is ignored, and the clock starts at the edge.
"""

from __future__ import annotations

import re
from typing import Any

HEADER = b"x-request-start"
MAX_PROXY_WAIT_MS = 5000.0  # HAProxy's request deadline (RECSERVE_HAPROXY_REQUEST_TIMEOUT_S's default, 5 s)
_STAMP = re.compile(rb"t=([0-9]{1,19}(?:\.[0-9]{1,9})?)")


def proxy_wait_ms(headers: Any, now_s: float) -> float:
    """Milliseconds between the proxy's stamp and `now_s` (time.time(), s since the epoch).

    `headers` are ASGI headers ([(name, value)], names lower-case). The stamp is `t=` and the time since the epoch
    in seconds, milliseconds or microseconds, told apart by size as New Relic reads it; 0.0 without one, or when
    the wait is out of [0, MAX_PROXY_WAIT_MS]."""
    raw = next((v for k, v in headers if k == HEADER), None)
    if raw is None:
        return 0.0
    found = _STAMP.fullmatch(raw.strip())
    if found is None:
        return 0.0
    stamp = float(found[1])
    stamp *= 1e-6 if stamp > 1e14 else 1e-3 if stamp > 1e11 else 1.0
    waited = (now_s - stamp) * 1000
    return waited if 0.0 <= waited <= MAX_PROXY_WAIT_MS else 0.0
