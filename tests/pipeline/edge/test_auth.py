"""API keys at the edge, over real HTTP (uvicorn on a loopback port in front of the Ray-less app: real models on the
slice bundle, Feast on the real Redis): who may write events, administer, and force an arm; what every refusal
says; rotation; keys from the environment and from a file that changes; and `recserve rollout`'s admin check."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterator

import httpx
import pytest

import pipeline.edge.auth as auth
from chain.rollout import ArmSpec, RolloutSpec
from models.errors import ConfigError
from pipeline.commands.keys import create
from pipeline.commands.rollout import require_admin
from pipeline.edge.api import Api, build_api
from pipeline.edge.auth import KeyRing
from pipeline.serve.args import AppArgs
from pipeline.serve.local import make_api
from settings import AuthSettings
from tests.pipeline.conftest import catalog
from tests.support.keys import bearer, new_key, ring
from tests.support.serve import serving

pytestmark = pytest.mark.integration

EVENTS_KEY, EVENTS_ENTRY = new_key("writer", "events:write")
OTHER_KEY, OTHER_ENTRY = new_key("writer-next", "events:write")  # a second writer key: rotation
ADMIN_KEY, ADMIN_ENTRY = new_key("ops", "admin")


@pytest.fixture(scope="module")
def api(small_bundle, slice_online, store_settings) -> Api:
    return make_api(AppArgs(bundle=small_bundle, store=store_settings))


@pytest.fixture(scope="module")
def url(api) -> Iterator[str]:
    with serving(build_api(lambda: api, keys=ring(EVENTS_ENTRY, OTHER_ENTRY, ADMIN_ENTRY))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def event_body(small_bundle, user: str = "auth-user") -> dict:
    return {"events": [{"user_id": user, "item_id": catalog(small_bundle)[0], "event_type": "view"}]}


def refused(r: httpx.Response, status: int) -> dict:
    """A 401 or 403 in the service's one error shape, naming the Authorization header, with a bearer challenge."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"request_id", "error", "field"}, body
    assert body["request_id"] == r.headers["x-request-id"] and body["field"] == "Authorization"
    assert r.headers["www-authenticate"].startswith('Bearer realm="recserve"')
    return body


def test_events_need_a_key_with_the_events_scope(client, small_bundle):
    missing = refused(client.post("/events", json=event_body(small_bundle)), 401)
    assert "POST /events needs an API key with scope events:write" in missing["error"]
    assert "Authorization: Bearer <key>" in missing["error"]
    wrong = client.post("/events", json=event_body(small_bundle), headers=bearer("not-a-key"))
    assert "not one of this service's keys" in refused(wrong, 401)["error"]
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    basic = client.post("/events", json=event_body(small_bundle), headers={"Authorization": f"Basic {EVENTS_KEY}"})
    assert "is not `Bearer <key>`" in refused(basic, 401)["error"]
    empty = client.post("/events", json=event_body(small_bundle), headers={"Authorization": "Bearer"})
    refused(empty, 401)
    ok = client.post("/events", json=event_body(small_bundle), headers=bearer(EVENTS_KEY))
    assert ok.status_code == 202 and ok.json()["accepted"] == 1


def test_a_key_is_checked_before_the_body_is_read(client):
    # Without a key, nothing about the body is answered: not JSON, wrong schema, wrong media type.
    for content, kind in (
        (b"{not json", "application/json"),
        (b'{"nope": 1}', "application/json"),
        (b"x", "text/plain"),
    ):
        r = client.post("/events", content=content, headers={"Content-Type": kind})
        refused(r, 401)
    # With the key, the body's own errors come back as before.
    bad = client.post(
        "/events", content=b"{not json", headers={"Content-Type": "application/json", **bearer(EVENTS_KEY)}
    )
    assert bad.status_code == 400 and bad.json()["field"] == "body"


def test_two_keys_are_valid_at_once_for_rotation(client, small_bundle):
    for key in (EVENTS_KEY, OTHER_KEY):
        r = client.post("/events", json=event_body(small_bundle, "rotating-user"), headers=bearer(key))
        assert r.status_code == 202, r.text


def test_admin_routes_need_admin_and_admin_implies_every_scope(client, small_bundle, api):
    refused(client.get("/admin/rollout"), 401)
    forbidden = refused(client.get("/admin/rollout", headers=bearer(EVENTS_KEY)), 403)
    assert forbidden["error"].startswith("key 'writer' has scope events:write; GET /admin/rollout needs admin")
    assert "recserve keys create --name NAME --scope admin" in forbidden["error"]
    assert (
        'error="insufficient_scope", scope="admin"'
        in client.get("/admin/rollout", headers=bearer(EVENTS_KEY)).headers["www-authenticate"]
    )
    r = client.get("/admin/rollout", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200, r.text
    body = r.json()
    ready = client.get("/readyz").json()
    # The same arms and state /readyz shows, from the one helper, plus the specs.
    assert body["arms"] == ready["arms"] and body["rollout"] == ready["rollout"] == "serving"
    assert body["serving"] == body["target"] and body["serving"]["arms"][0]["role"] == "champion"
    assert body["model_version"] == api.chain.core.version == "slice-v1"
    assert client.post("/events", json=event_body(small_bundle), headers=bearer(ADMIN_KEY)).status_code == 202


def test_read_routes_stay_open(client, small_bundle):
    item = catalog(small_bundle)[0]
    assert client.post("/recommend", json={"user_id": "12347", "k": 2}).status_code == 200
    assert client.get(f"/items/{item}/similar").status_code == 200
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_a_header_forces_an_arm_for_admins_only(client, api, small_bundle):
    # Two arms on the one bundle (nothing to load): each user is assigned one; the header overrides it.
    spec = RolloutSpec(
        salt="forced",
        arms=(
            ArmSpec(name="champion", bundle=str(small_bundle), weight=50, role="champion"),
            ArmSpec(name="other", bundle=str(small_bundle), weight=50),
        ),
    )

    async def switch(to: RolloutSpec) -> None:
        api.rollout.apply(to)
        await api.rollout.wait(30)

    asyncio.run(switch(spec))
    try:
        body = {"user_id": "12347", "k": 3}
        own = client.post("/recommend", json=body).json()["arm"]
        other = "other" if own == "champion" else "champion"
        forced = client.post("/recommend", json=body, headers={"X-Recserve-Arm": other, **bearer(ADMIN_KEY)})
        assert forced.status_code == 200 and forced.json()["arm"] == other
        refused(client.post("/recommend", json=body, headers={"X-Recserve-Arm": other}), 401)
        no_scope = client.post("/recommend", json=body, headers={"X-Recserve-Arm": other, **bearer(EVENTS_KEY)})
        assert "X-Recserve-Arm on POST /recommend needs admin" in refused(no_scope, 403)["error"]
        unknown = client.post("/recommend", json=body, headers={"X-Recserve-Arm": "nope", **bearer(ADMIN_KEY)})
        assert unknown.status_code == 400
        assert unknown.json()["error"] == "no arm 'nope' in the running rollout: name one of champion, other"
        # Without the header, a key is neither needed nor looked at.
        assert client.post("/recommend", json=body, headers=bearer("not-a-key")).json()["arm"] == own
    finally:
        asyncio.run(switch(RolloutSpec.single(str(small_bundle))))


def test_with_no_key_configured_guarded_routes_refuse_and_say_how_to_make_one(api, small_bundle):
    with serving(build_api(lambda: api)) as base, httpx.Client(base_url=base, timeout=30) as c:
        for r in (
            c.post("/events", json=event_body(small_bundle), headers=bearer(EVENTS_KEY)),
            c.get("/admin/rollout"),
        ):
            error = refused(r, 401)["error"]
            assert "this service has none configured" in error and "recserve keys create --name NAME" in error
        assert c.post("/recommend", json={"user_id": "12347", "k": 1}).status_code == 200


def test_the_spec_declares_the_bearer_scheme_on_the_guarded_operations(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "opaque key",
        "description": "",
    }
    paths = spec["paths"]
    for method, path in (("post", "/events"), ("get", "/admin/rollout")):
        op = paths[path][method]
        assert op["security"] == [{"ApiKey": []}]
        for code in ("401", "403"):
            assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert paths["/recommend"]["post"]["security"] == [{}, {"ApiKey": []}]  # a key only with X-Recserve-Arm
    assert "X-Recserve-Arm" in paths["/recommend"]["post"]["description"]
    for path in ("/items/{item_id}/similar", "/healthz", "/readyz"):
        assert "security" not in paths[path]["get"], path


def test_every_digest_is_compared_in_constant_time(monkeypatch):
    keys = [new_key(f"k{i}", "events:write") for i in range(3)]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counted)
    keyring = ring(*(entry for _, entry in keys))
    for key, _ in keys:  # the first, a middle and the last key: every digest is compared, whichever matches
        calls.clear()
        assert keyring.match(key) is not None
        assert [b for _, b in calls] == [k.digest for k in keyring.keys]
        assert {a for a, _ in calls} == {hashlib.sha256(key.encode()).digest()}
    calls.clear()
    assert keyring.match("nobody's key") is None and len(calls) == 3


def test_keys_from_the_environment_and_a_file_that_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)  # look at the file on every check, not once a second
    path = tmp_path / "keys"
    inline_key, inline_entry = new_key("from-env", "admin")
    first = create("first", ("events:write",), path)
    keyring = KeyRing(AuthSettings(api_keys=f"# ops\n;{inline_entry}", api_keys_file=path))
    assert [k.name for k in keyring.keys] == ["from-env", "first"]
    assert keyring.authorize(f"Bearer {inline_key}", "admin", "test").name == "from-env"
    assert keyring.authorize(f"Bearer {first}", "events:write", "test").name == "first"
    # Rotation without a restart: a second key is created, then the first one's line is deleted.
    second = create("second", ("events:write",), path)
    assert keyring.match(second).name == "second" and keyring.match(first).name == "first"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("first ")))
    assert keyring.match(first) is None and keyring.match(second).name == "second"
    # A broken edit keeps the keys read before, so a typo cannot lock everyone out.
    path.write_text(path.read_text() + "typo\n")
    assert keyring.match(second).name == "second"
    # ... but at start it stops the service, naming the line and the fix.
    with pytest.raises(ConfigError, match=rf"{path} line 2: 1 words, not 3: write `<name> <sha256"):
        KeyRing(AuthSettings(api_keys_file=path))


def test_rollout_commands_check_the_admin_key_first(url):
    with pytest.raises(ConfigError, match="needs an API key with scope admin: pass --key KEY or set RECSERVE_API_KEY"):
        require_admin(url, None)
    with pytest.raises(ConfigError, match=r"refused the key \(401\): the API key sent is not one of"):
        require_admin(url, "not-a-key")
    with pytest.raises(ConfigError, match=r"refused the key \(403\): key 'writer' has scope events:write"):
        require_admin(url, EVENTS_KEY)
    assert require_admin(url, ADMIN_KEY)["rollout"] == "serving"
