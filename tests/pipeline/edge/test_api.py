"""The HTTP edge over real HTTP: uvicorn on a loopback port in front of the Ray-less app (real models on the slice
bundle, Feast on the real Redis). Raw sockets send what a well-behaved client library never would: chunked
bodies, half-sent bodies, bytes that are not UTF-8."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from ray.serve._private.http_util import _apply_middlewares

from models.data import normalize_item_id
from pipeline.edge.api import DRAIN_FACTOR, Api, build_api
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api
from pipeline.serve.request_id import REQUEST_ID, serve_middlewares
from tests.pipeline.conftest import catalog
from tests.support.keys import bearer, new_key, ring
from tests.support.serve import serving

pytestmark = pytest.mark.integration

MAX_BODY = 1_000_000
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def api(small_bundle, slice_online, store_settings) -> Api:
    return make_api(AppArgs(bundle=small_bundle, store=store_settings))


# A key that may write events: the client below sends it on every request (the open routes ignore it).
EVENTS_KEY, EVENTS_ENTRY = new_key("edge-tests", "events:write")


@pytest.fixture(scope="module")
def url(api) -> Iterator[str]:
    """The app as pipeline.serve.local serves it, every edge setting at its default (1 MB, 5 s)."""
    with serving(build_api(lambda: api, keys=ring(EVENTS_ENTRY))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30, headers=bearer(EVENTS_KEY)) as c:
        yield c


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    def header(self, name: str) -> str:
        (value,) = self.headers[name]  # exactly one
        return value


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(url)))
    s.settimeout(30)
    s.sendall(head)
    return s


def read_answer(s: socket.socket, began: float) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        assert got, f"connection closed before an answer: {buf!r}"
        buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = int(headers["content-length"][0])
    while len(body) < length:
        got = s.recv(65536)
        assert got
        body += got
    return Answer(int(status_line.split()[1]), headers, body, time.monotonic() - began)


def send(url: str, head: bytes, body: bytes = b"", chunks: list[bytes] | None = None) -> Answer:
    """One request over its own connection, bytes exactly as given."""
    began = time.monotonic()
    s = connect(url, head + body)
    try:
        for c in chunks or []:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed before reading it all: read its answer
        return read_answer(s, began)
    finally:
        s.close()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: edge", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def one_shape(a: Answer) -> dict:
    """The service's error body, with the X-Request-ID header's value."""
    body = a.json
    assert set(body) == {"request_id", "error", "field"}, body
    assert body["request_id"] == a.header("x-request-id")
    return body


def test_framework_404_and_405_answer_in_the_one_shape_and_say_the_fix(url):
    missing = send(url, b"GET /recommendations HTTP/1.1\r\nHost: edge\r\n\r\n")
    assert missing.status == 404
    body = one_shape(missing)
    assert "no route '/recommendations'" in body["error"] and "POST /recommend" in body["error"]
    wrong = send(url, b"GET /recommend HTTP/1.1\r\nHost: edge\r\n\r\n")
    assert wrong.status == 405 and wrong.header("allow") == "POST"
    assert one_shape(wrong)["error"] == "/recommend takes POST, not GET: send POST"
    deleted = send(url, b"DELETE /items/85123A/similar HTTP/1.1\r\nHost: edge\r\n\r\n")
    assert deleted.status == 405 and "not DELETE: send GET" in one_shape(deleted)["error"]


def test_a_chunked_body_over_the_limit_is_413_like_a_declared_one(url):
    big = b'{"user_id": "' + b"x" * (MAX_BODY + 1000) + b'"}'
    step = 64 * 1024
    chunks = [b"%x\r\n%s\r\n" % (len(big[i : i + step]), big[i : i + step]) for i in range(0, len(big), step)]
    head = b"POST /recommend HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    head += b"\r\n"
    chunked = send(url, head, chunks=[*chunks, b"0\r\n\r\n"])
    assert chunked.status == 413, chunked.body
    assert one_shape(chunked) | {"request_id": ""} == {
        "request_id": "",
        "error": f"the body exceeds {MAX_BODY} bytes, the limit: send less",
        "field": "body",
    }
    assert "connection" not in chunked.headers  # read to its end: the connection can carry the next request
    declared = send(url, post("/recommend", big, "Content-Type: application/json"), big)
    assert declared.status == 413 and f"the limit is {MAX_BODY}" in one_shape(declared)["error"]
    # Just under the limit, chunked, is read and answered.
    ok = b'{"user_id": "12347", "k": 2, "context": {"pad": "' + b"x" * (MAX_BODY - 100) + b'"}}'
    fine = send(url, head, chunks=[b"%x\r\n%s\r\n" % (len(ok), ok), b"0\r\n\r\n"])
    assert fine.status == 200 and len(fine.json["items"]) == 2


def test_a_refused_body_is_read_to_its_end_so_the_connection_carries_the_next_request(url):
    """HAProxy closes a client connection whose request body was not all read, without telling the client (it drops
    the replica's `Connection: close`): the next request on it failed with no answer. So the edge reads a refused
    body to its end, up to DRAIN_FACTOR x the limit; past that it answers and closes."""
    big = b'{"user_id": "' + b"x" * (2 * MAX_BODY) + b'"}'
    small = b'{"user_id": "12347", "k": 2}'
    began = time.monotonic()
    s = connect(url, post("/recommend", big, "Content-Type: application/json"))
    try:
        s.sendall(big)
        refused = read_answer(s, began)
        assert refused.status == 413 and "connection" not in refused.headers, refused.headers
        s.sendall(post("/recommend", small, "Content-Type: application/json") + small)
        after = read_answer(s, began)
        assert after.status == 200 and len(after.json["items"]) == 2
    finally:
        s.close()
    huge = DRAIN_FACTOR * MAX_BODY + 1  # declared, never sent: not worth reading
    s = connect(url, f"POST /recommend HTTP/1.1\r\nHost: edge\r\nContent-Length: {huge}\r\n\r\n".encode())
    try:
        closed = read_answer(s, time.monotonic())
        assert closed.status == 413 and closed.header("connection") == "close"
        assert s.recv(65536) == b""  # and closed
    finally:
        s.close()


def test_a_body_that_is_not_utf8_is_400_naming_body(url):
    body = b'{"user_id":"12\xff47","k":3}'
    a = send(url, post("/recommend", body, "Content-Type: application/json"), body)
    assert a.status == 400
    assert one_shape(a)["field"] == "body"
    assert a.json["error"] == "the body is not UTF-8: byte 14 is 0xff: send JSON encoded as UTF-8"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"[1, 2]", 422, "the body is a JSON array, not an object: send a JSON object"),
        (b'"12347"', 422, "the body is a JSON string, not an object"),
        (b'{"user_id": "12347", "k": NaN}', 400, "the body holds NaN, which is not a JSON number"),
        (b'{"user_id": "12347", "context": {"x": -Infinity}}', 400, "holds -Infinity"),
        (b'{"user_id": "12347"', 400, "the body is not valid JSON (Expecting ',' delimiter at line 1 column 20)"),
        (b'{"user_id": "12347", "context": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
        (b"", 422, "the body is empty: send a JSON object"),
    ],
)
def test_a_body_that_is_not_one_json_object_names_the_body(client, body, status, words):
    r = client.post("/recommend", content=body, headers=JSON)
    assert r.status_code == status and r.json()["field"] == "body", r.text[:300]
    assert words in r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"user_id": "12347", "k": ' + b"7" * 4301 + b"}", "k"),
        (b'{"user_id": "12347", "k": -' + b"7" * 5000 + b"}", "k"),
        (b'{"user_id": "12347", "context": {"page": [1, ' + b"7" * 4301 + b"]}}", "context.page.1"),
    ],
)
def test_an_integer_too_long_to_read_is_422_naming_its_field(url, body, field):
    a = send(url, post("/recommend", body, "Content-Type: application/json"), body)
    assert a.status == 422
    assert one_shape(a)["field"] == field
    assert "digits is longer than the 4300 digits this service reads" in a.json["error"]


def test_one_digit_fewer_is_an_ordinary_range_error(url):
    body = b'{"user_id": "12347", "k": ' + b"7" * 4300 + b"}"
    a = send(url, post("/recommend", body, "Content-Type: application/json"), body)
    assert a.status == 422 and one_shape(a)["field"] == "k" and "less than or equal to 100" in a.json["error"]


def test_half_a_surrogate_pair_is_422_naming_the_field(url):
    body = b'{"user_id": "ab\\ud800cd", "k": 2}'
    a = send(url, post("/recommend", body, "Content-Type: application/json"), body)
    assert a.status == 422 and one_shape(a)["field"] == "user_id"
    pair = b'{"user_id": "ab\\ud83d\\ude00cd", "k": 2}'  # a whole pair is one character, and fine
    assert send(url, post("/recommend", pair, "Content-Type: application/json"), pair).status == 200


def test_a_gzip_body_is_decoded_and_answers_as_the_plain_one(client):
    plain = json.dumps({"user_id": "12347", "k": 4}).encode()
    a = client.post("/recommend", content=plain, headers=JSON)
    b = client.post("/recommend", content=gzip.compress(plain), headers={**JSON, "Content-Encoding": "gzip"})
    assert a.status_code == b.status_code == 200
    assert [i["item_id"] for i in a.json()["items"]] == [i["item_id"] for i in b.json()["items"]]
    two_members = gzip.compress(plain[:10]) + gzip.compress(plain[10:])
    c = client.post("/recommend", content=two_members, headers={**JSON, "Content-Encoding": "gzip"})
    assert c.status_code == 200


def test_gzip_that_is_broken_or_decodes_past_the_limit_and_other_encodings_are_refused(url):
    plain = b'{"user_id": "12347", "k": 2}'
    broken = send(url, post("/recommend", plain, "Content-Type: application/json", "Content-Encoding: gzip"), plain)
    assert broken.status == 400 and "not gzip data" in one_shape(broken)["error"]
    bomb = gzip.compress(b'{"user_id": "' + b"x" * (20 * MAX_BODY) + b'"}')  # ~20 kB that decode to 20 MB
    assert len(bomb) < MAX_BODY / 10
    big = send(url, post("/recommend", bomb, "Content-Type: application/json", "Content-Encoding: gzip"), bomb)
    assert big.status == 413 and one_shape(big)["error"].startswith(f"the body decodes to over {MAX_BODY} bytes")
    br = send(url, post("/recommend", plain, "Content-Type: application/json", "Content-Encoding: br"), plain)
    assert br.status == 415 and br.header("accept-encoding") == "gzip"
    assert one_shape(br)["field"] == "Content-Encoding" and "Content-Encoding: gzip" in br.json["error"]


def test_a_body_that_is_not_json_by_its_content_type_is_415(url):
    body = b'{"user_id": "12347"}'
    for head in (post("/recommend", body, "Content-Type: text/plain"), post("/recommend", body)):
        a = send(url, head, body)
        assert a.status == 415 and one_shape(a)["field"] == "Content-Type"
        assert "send JSON with Content-Type: application/json" in a.json["error"]


def test_the_header_and_the_body_carry_one_request_id(url, client):
    known = client.post("/recommend", json={"user_id": "12347", "k": 1}, headers={"X-Request-ID": "caller-42"})
    assert known.headers.get_list("x-request-id") == ["caller-42"] and known.json()["request_id"] == "caller-42"
    bad = "X-Request-ID: has spaces in it"
    ok, invalid = b'{"user_id": "12347", "k": 1}', b'{"k": 0}'
    for head, body in [
        (post("/recommend", ok, "Content-Type: application/json", bad), ok),
        (post("/recommend", invalid, "Content-Type: application/json", bad), invalid),
        (f"GET /nope HTTP/1.1\r\nHost: edge\r\n{bad}\r\n\r\n".encode(), b""),
        (f"GET /events HTTP/1.1\r\nHost: edge\r\n{bad}\r\n\r\n".encode(), b""),
    ]:
        a = send(url, head, body)
        rid = a.header("x-request-id")  # exactly one header
        assert REQUEST_ID.fullmatch(rid) and rid != "has spaces in it"
        assert a.json["request_id"] == rid, a.body


def test_behind_serves_middleware_the_header_and_the_body_agree_too(api):
    """Ray mode: the app does not set the header; Serve's own RequestIdMiddleware echoes what it finds on the
    request, and the RequestIdGate that `recserve serve` installs in front of it makes that a valid id. The
    middleware stack is built by Serve's own function, as its proxy and direct-ingress servers build it."""
    app = _apply_middlewares(build_api(lambda: api, set_request_id=False), serve_middlewares())
    bare = _apply_middlewares(build_api(lambda: api, set_request_id=False), [])  # no gate: Serve's echo alone
    body = {"user_id": "12347", "k": 1}

    async def go(asgi: object, rid: str | None) -> httpx.Response:
        headers = {"X-Request-ID": rid} if rid is not None else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://serve") as c:
            return await c.post("/recommend", json=body, headers=headers)

    for rid in ("caller-42", "has spaces in it", None):
        r = asyncio.run(go(app, rid))
        (header,) = r.headers.get_list("x-request-id")
        assert r.status_code == 200 and r.json()["request_id"] == header and REQUEST_ID.fullmatch(header)
        assert (header == rid) == (rid == "caller-42")
        r = asyncio.run(go(bare, rid))
        (header,) = r.headers.get_list("x-request-id")
        assert r.json()["request_id"] == header


def test_a_body_that_does_not_arrive_in_5_s_is_408_and_half_sent_uploads_never_shed_real_callers(api, url, client):
    knobs = api.chain.knobs
    api.chain.reconfigure(knobs.model_copy(update={"max_in_flight": 4}))
    idle: list[socket.socket] = []
    try:
        began = time.monotonic()
        # Ten times the in-flight limit: connections whose headers came and whose body never will.
        for _ in range(40):
            idle.append(connect(url, post("/recommend", b"x" * 100, "Content-Type: application/json") + b'{"us'))
        time.sleep(0.3)
        answers = [client.post("/recommend", json={"user_id": "12347", "k": 3}) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5, [r.text for r in answers]
        timed_out = read_answer(idle[0], began)
        assert timed_out.status == 408 and 4.9 < timed_out.seconds < 7
        assert one_shape(timed_out) | {"request_id": ""} == {
            "request_id": "",
            "error": "the body did not arrive within 5 s (4 bytes of 100 came): send the whole request at once, "
            "then retry",
            "field": "body",
        }
        assert timed_out.header("connection") == "close"
        assert all(read_answer(s, began).status == 408 for s in idle[1:])
    finally:
        for s in idle:
            s.close()
        api.chain.reconfigure(knobs)


def test_ids_from_clients_are_normalized_as_the_data_is_cleaned(api, client, small_bundle, slice_online):
    items = catalog(small_bundle)
    first = client.post("/recommend", json={"user_id": "12347", "k": 100}).json()["items"]
    top = next(i["item_id"] for i in first if not i["item_id"].isdigit())  # a code with a letter: 85123A
    for written in (top.lower(), f"  {top} ", f"\t{top.lower()}\n"):
        again = client.post("/recommend", json={"user_id": " 12347 ", "k": 100, "exclude": [written]})
        assert again.status_code == 200 and again.json()["user_id"] == "12347"
        assert top not in {i["item_id"] for i in again.json()["items"]}, written
    # /items/{id}/similar: the same item however it is written, and the answer names it as the catalog does.
    similar = client.get(f"/items/%20{top.lower()}%20/similar", params={"k": 5})
    assert similar.status_code == 200 and similar.json()["item_id"] == top
    same = client.get(f"/items/{top}/similar", params={"k": 5}).json()["items"]
    assert similar.json()["items"] == same
    # Events: a lower-case, padded code is the catalog's item, stored as the catalog writes it.
    user = "normalized-user"
    code = next(i for i in items if not i.isdigit())
    sent = {"user_id": f" {user}", "item_id": f" {code.lower()} ", "event_type": "view"}
    r = client.post("/events", json={"events": [sent]})
    assert r.status_code == 202, r.text
    stored = slice_online.user(user).realtime
    assert stored.event_count == 1 and stored.events[0].item_id == code == normalize_item_id(sent["item_id"])


def test_an_id_of_only_whitespace_is_refused(client, small_bundle):
    r = client.post("/recommend", json={"user_id": "   ", "k": 2})
    assert r.status_code == 422 and r.json()["field"] == "user_id" and "only whitespace" in r.json()["error"]
    item = catalog(small_bundle)[0]
    r = client.post("/events", json={"events": [{"user_id": "\t", "item_id": item, "event_type": "view"}]})
    assert r.status_code == 422 and r.json()["error"] == "events[0].user_id: is only whitespace: send the id"


def test_a_repeated_event_id_is_accepted_and_counted_once(client, slice_online, small_bundle):
    item = catalog(small_bundle)[1]
    user = "retrying-client"
    event = {"user_id": user, "item_id": item, "event_type": "add_to_cart", "event_id": "evt-1"}
    answers = [client.post("/events", json={"events": [event]}) for _ in range(3)]
    assert [r.status_code for r in answers] == [202] * 3 and {r.json()["accepted"] for r in answers} == {1}
    assert slice_online.user(user).realtime.event_count == 1
    other = client.post("/events", json={"events": [event | {"event_id": "evt-2"}, event]})
    assert other.status_code == 202 and other.json()["accepted"] == 2
    assert slice_online.user(user).realtime.event_count == 2


def test_an_unexpected_failure_is_a_500_in_the_one_shape(client):
    def starting() -> Api:
        raise RuntimeError("the ingress is still starting")

    app = build_api(starting)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as c:
            return await c.post("/recommend", json={"user_id": "12347"}, headers={"X-Request-ID": "boom-1"})

    r = asyncio.run(go())
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {
        "request_id": "boom-1",
        "error": "internal error: retry; if it persists, report request_id boom-1 (the service logs it)",
        "field": None,
    }


def test_the_spec_documents_every_error_status_in_the_one_shape(client):
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            for code in ("400", "404", "405", "408", "413", "415", "422", "500", "503"):
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", (method, path, code)
    event = spec["components"]["schemas"]["EventsRequest"]["properties"]["events"]["items"]
    assert set(event["properties"]) == {"user_id", "item_id", "event_type", "timestamp", "event_id"}
    assert event["additionalProperties"] is False
