"""recserve's locust suite: realistic traffic at a fixed rate, with a p99 SLO gate.

    RECSERVE_API_KEY=<a key with scope events:write> \
    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 20 -r 20 --run-time 60s \
        --rate-per-user 1 --p99-ms 100 --csv reports/colocated --html reports/colocated.html

Traffic, from the bundle's data: about 85% POST /recommend for holdout users (10% of them unknown users, 5% of the calls
with a product query from traffic.QUERIES), about
10% POST /events with plausible events for users in flight, about 5% GET /items/{id}/similar.

Arrivals are open loop: each simulated user keeps its own schedule at --rate-per-user requests a second, whatever
the latency, so the offered rate is users x rate. --arrival steady (the default, CI's gate) sends one request a
period from a random phase; --arrival poisson-bursty sends Poisson arrivals at twice the rate for 2 s in every
10 s of wall-clock time, so the bursts of all users coincide and the mean offered rate is 1.2x --rate-per-user
(loadtests/arrivals.py). A user sends one request at a time: when its next arrival falls due while its previous
request is still in flight, that request leaves late (the schedule does not slip, so the offered count holds);
the summary line counts those sends, more than 10 ms late, as `late`.

The gate fails (exit code 1) when p99 exceeds --p99-ms, when the error rate exceeds --max-error-rate, or when more
than --max-degraded-share of /recommend answers were degraded; one summary line says which.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import arrivals
from loadtests import traffic as traffic_data
from settings import AuthSettings

EVENT_MIX = (("view", 0.7), ("add_to_cart", 0.2), ("purchase", 0.1))
# A send more than this after its due time was held back by the user's previous request (s).
LATE_S = 0.010
state: dict[str, Any] = {
    "traffic": None,
    "recommends": 0,
    "degraded": 0,
    "shed": 0,
    "late": 0,
    "answered_ms": [],
    "in_flight": [],
    "auth": {},  # the Authorization header POST /events carries
}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--p99-ms", type=float, default=100.0, help="SLO: p99 latency bound (ms)")
    parser.add_argument("--max-error-rate", type=float, default=0.0, help="SLO: failed share of requests")
    parser.add_argument("--max-degraded-share", type=float, default=0.01, help="SLO: degraded share of /recommend")
    parser.add_argument("--rate-per-user", type=float, default=1.0, help="base requests a second per simulated user")
    parser.add_argument(
        "--arrival",
        choices=sorted(arrivals.PATTERNS),
        default="steady",
        help="steady: one request a period; poisson-bursty: Poisson at 2x the base rate for 2 s in every 10 s",
    )
    parser.add_argument("--bundle", default="", help="bundle directory (default: the one artifacts/LATEST names)")
    parser.add_argument(
        "--shed-ok",
        action="store_true",
        help="overload runs: a 503 with Retry-After is load shed as designed, counted apart and not a failure",
    )


@events.init.add_listener
def _load(environment: Any, **_: Any) -> None:
    bundle = Path(environment.parsed_options.bundle) if environment.parsed_options.bundle else None
    state["traffic"] = traffic_data.load(bundle)
    key = AuthSettings().api_key  # RECSERVE_API_KEY: the harness (loadtests/systems.py) sets the run's key
    if key is None:
        print("locust: RECSERVE_API_KEY is unset, so POST /events will be refused (401)", file=sys.stderr, flush=True)
    else:
        state["auth"] = {"Authorization": f"Bearer {key.get_secret_value()}"}
    # The load blocks gevent's loop for seconds, and libev's clock is only read once a loop turn: without this,
    # locust's --run-time timer, armed next, counts from the stale time and ends the run that much early (a 30 s
    # step ran 23 s here, and 13 s on a busy machine).
    gevent.get_hub().loop.update_now()


class Shopper(FastHttpUser):
    """One client on its own arrival schedule. geventhttpclient, not requests: several times less CPU a request
    (locust's docs), and the load generator shares this machine's two cores with the server (7-13% of them up to
    400/s)."""

    def wait_time(self) -> float:
        # Open loop: the next request is due at the schedule's next arrival, not a gap after the last one finished,
        # so a slow answer does not lower the offered rate.
        late = time.time() - next(self.arrivals)
        if late > LATE_S:
            state["late"] += 1
        return max(0.0, -late)

    def on_start(self) -> None:
        self.rng = random.Random()
        opts = self.environment.parsed_options
        # Unix time, not perf_counter: the bursts sit at fixed wall-clock seconds, the same for every user.
        self.arrivals = arrivals.PATTERNS[opts.arrival](opts.rate_per_user, self.rng, time.time())
        gevent.sleep(max(0.0, next(self.arrivals) - time.time()))

    def _user(self) -> str:
        t = state["traffic"]
        return f"load-new-{self.rng.randrange(10**9)}" if self.rng.random() < 0.1 else self.rng.choice(t.users)

    def _call(self, method: str, path: str, name: str, expect: int, **kw: Any) -> Any:
        """The parsed body of an expected answer; None after a failure or a shed request."""
        started = time.perf_counter()
        with self.client.request(method, path, catch_response=True, name=name, **kw) as r:
            if r.status_code == 503 and r.headers and r.headers.get("Retry-After"):
                state["shed"] += 1
                if self.environment.parsed_options.shed_ok:
                    r.success()
                else:
                    r.failure(f"shed: {r.text[:200]}")
                return None
            if r.status_code != expect:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
                return None
            state["answered_ms"].append((time.perf_counter() - started) * 1000)
            return r.json()

    @task(85)
    def recommend(self) -> None:
        user = self._user()
        request: dict[str, Any] = {"user_id": user, "k": 10}
        if self.rng.random() < traffic_data.QUERY_SHARE:
            request["query"] = self.rng.choice(traffic_data.QUERIES)
        body = self._call("POST", "/recommend", "/recommend", 200, json=request)
        if body is None:
            return
        state["recommends"] += 1
        state["degraded"] += bool(body.get("degraded"))
        if len(body.get("items", [])) != 10:
            self.environment.events.request.fire(
                request_type="CHECK",
                name="/recommend items",
                response_time=0,
                response_length=0,
                exception=AssertionError(f"{len(body.get('items', []))} items, not 10"),
            )
        in_flight = state["in_flight"]
        in_flight.append((user, [i["item_id"] for i in body["items"]]))
        del in_flight[:-200]

    @task(10)
    def events(self) -> None:
        if not state["in_flight"]:
            return
        user, shown = self.rng.choice(state["in_flight"])
        kind = self.rng.choices([k for k, _ in EVENT_MIX], [w for _, w in EVENT_MIX])[0]
        event = {"user_id": user, "item_id": self.rng.choice(shown), "event_type": kind}
        self._call("POST", "/events", "/events", 202, json={"events": [event]}, headers=state["auth"])

    @task(5)
    def similar(self) -> None:
        item = self.rng.choice(state["traffic"].items)
        self._call("GET", f"/items/{item}/similar?k=10", "/items/{id}/similar", 200)


@events.quitting.add_listener
def _gate(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    total = environment.stats.total
    n, failures = total.num_requests, total.num_failures
    p50, p95, p99 = (total.get_response_time_percentile(q) or 0.0 for q in (0.5, 0.95, 0.99))
    error_rate = failures / n if n else 1.0
    degraded = state["degraded"] / state["recommends"] if state["recommends"] else 0.0
    answered = sorted(state["answered_ms"])
    answered_p99 = answered[min(len(answered) - 1, int(0.99 * len(answered)))] if answered else 0.0
    problems = []
    if n == 0:
        problems.append("no requests")
    if p99 > opts.p99_ms:
        problems.append(f"p99 {p99:.0f} ms > {opts.p99_ms:.0f} ms")
    if error_rate > opts.max_error_rate:
        problems.append(f"error rate {error_rate:.4f} > {opts.max_error_rate}")
    if degraded > opts.max_degraded_share:
        problems.append(f"degraded {degraded:.4f} > {opts.max_degraded_share}")
    print(
        f"SLO gate {'FAIL' if problems else 'PASS'}: requests {n}, failures {failures}, p50 {p50:.0f} ms, "
        f"p95 {p95:.0f} ms, p99 {p99:.0f} ms, rps {total.total_rps:.1f}, degraded {degraded:.4f}, "
        f"shed {state['shed']}, answered p99 {answered_p99:.0f} ms, late {state['late']}, arrival {opts.arrival}"
        + (f" ({'; '.join(problems)})" if problems else ""),
        flush=True,
    )
    environment.process_exit_code = 1 if problems else 0
