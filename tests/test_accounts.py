"""Accounts (issue 16): API keys, ownership, per-key rate limits, order lists, the
account feed, backpressure. In process, against the app and a real redis-server; the
checks across web processes are in tests/test_accounts_faults.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from engine.core import accounts, keys
from engine.core.config import Config, ConfigError
from engine.core.status import OrderStatus
from engine.web.services import Services
from tests.faults.clients import raw_http
from tests.helpers import TEST_API_KEY, VALID_ORDER, eventually, post_order, read_until_closed
from tests.test_status_ws import drive_to_confirmed


def reconfigure(services: Services, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    """The web process's settings changed for one test, wherever they are read."""
    config = dataclasses.replace(services.config, **changes)
    for holder in (services, services.store, services.api_keys):
        monkeypatch.setattr(holder, "config", config)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(services: Services, name: str, **limits: Any) -> str:
    return await services.api_keys.create(name, **limits)


async def fetch(client: Any, path: str, key: str | None, **kwargs: Any) -> tuple[Any, Any]:
    """A call as ``key`` (None: with no Authorization at all); (response, JSON body)."""
    headers = {**kwargs.pop("headers", {}), **(bearer(key) if key is not None else {})}
    response = await client.fetch(path, headers=headers, raise_error=False, anonymous=key is None, **kwargs)
    return response, json.loads(response.body) if response.body else None


async def place(client: Any, key: str, **headers: str) -> str:
    response, body = await post_order(client, headers={**bearer(key), **headers})
    assert response.code == 202, body
    return str(body["order_id"])


def port_of(client: Any) -> int:
    return int(client.get_url("").rsplit(":", 1)[1].strip("/"))


async def account_feed(client: Any, key: str) -> WebSocketClientConnection:
    url = client.get_url("/api/orders/status").replace("http://", "ws://")
    ws = await websocket_connect(HTTPRequest(url))
    await ws.write_message(f"Bearer {key}")
    return ws


async def subscribed_feed(client: Any, services: Services, name: str) -> WebSocketClientConnection:
    """A new key's account feed, past its ``subscribed`` answer."""
    feed = await account_feed(client, await new_key(services, name))
    assert "subscribed" in json.loads(await asyncio.wait_for(feed.read_message(), 10) or "{}")
    return feed


# -- ownership -----------------------------------------------------------------------------


async def test_each_key_sees_and_cancels_only_its_own_orders(
    http_server_client: Any, services: Services, redis: Redis
) -> None:
    alice, bob = await new_key(services, "alice"), await new_key(services, "bob")
    alices = await place(http_server_client, alice)
    bobs = await place(http_server_client, bob)
    missing = "6f1c2a3b-1111-4222-8333-444455556666"

    for method in ("GET", "DELETE"):
        # Another key's order: the very answer of an order that does not exist.
        other, other_body = await fetch(http_server_client, f"/api/orders/{bobs}", alice, method=method)
        none, none_body = await fetch(http_server_client, f"/api/orders/{missing}", alice, method=method)
        assert other.code == none.code == 404
        assert other_body == {**none_body, "message": f"no order {bobs}", "order_id": bobs}
        assert sorted(other.headers.get_all()) != [] and "RateLimit" in other.headers
    assert await redis.hget(keys.order(bobs), "status") == "pending"  # not cancelled

    mine, body = await fetch(http_server_client, f"/api/orders/{alices}", alice)
    assert mine.code == 200 and body["order_id"] == alices
    listed = {key: (await fetch(http_server_client, "/api/orders", key))[1] for key in (alice, bob)}
    assert [order["order_id"] for order in listed[alice]["orders"]] == [alices]
    assert [order["order_id"] for order in listed[bob]["orders"]] == [bobs]
    cancelled, body = await fetch(http_server_client, f"/api/orders/{bobs}", bob, method="DELETE")
    assert cancelled.code == 200 and body["status"] == "failed"
    assert await redis.hget(keys.order(bobs), "owner") == key_id_of(bob)


def key_id_of(key: str) -> str:
    """The id of an API key: what owns the orders it places."""
    parsed = accounts.Credentials.parse(key)
    assert parsed is not None
    return parsed.key_id


async def test_idempotency_keys_are_scoped_per_api_key(http_server_client: Any, services: Services) -> None:
    alice, bob = await new_key(services, "alice"), await new_key(services, "bob")
    first = await place(http_server_client, alice, **{"Idempotency-Key": "same"})
    # Bob's own order under the same value: not a conflict, not alice's order.
    response, body = await post_order(
        http_server_client, {**VALID_ORDER, "amount": 3}, headers={**bearer(bob), "Idempotency-Key": "same"}
    )
    assert response.code == 202 and body["order_id"] != first
    again, body = await post_order(http_server_client, headers={**bearer(alice), "Idempotency-Key": "same"})
    assert again.code == 202 and body["order_id"] == first
    assert again.headers["Idempotent-Replayed"] == "true"


# -- who is asking: 401 ---------------------------------------------------------------------

ROUTES = [
    ("POST", "/api/orders/execute"),
    ("GET", "/api/orders/6f1c2a3b-1111-4222-8333-444455556666"),
    ("DELETE", "/api/orders/6f1c2a3b-1111-4222-8333-444455556666"),
    ("GET", "/api/orders"),
    ("GET", "/api/orders?limit=5"),
]
# Another scheme's credentials, or none: a challenge with no error code (RFC 6750 3.1).
NOT_BEARER = ["", "Basic dXNlcjpwYXNz", f"Token {TEST_API_KEY}", f"{TEST_API_KEY}", "Digest x"]
# A Bearer header that is malformed: error="invalid_request".
MALFORMED = [
    "Bearer",
    "Bearer ",
    f"Bearer  {TEST_API_KEY} x",
    f"Bearer {TEST_API_KEY},{TEST_API_KEY}",  # two lines, as Tornado joins them
    f"Bearer {TEST_API_KEY[:-1]}",
    f"Bearer {TEST_API_KEY}=",
    f"Bearer {TEST_API_KEY.upper()}",
    "Bearer oek_zzzzzzzzzzzzzzzz_" + "a" * 43,
    "Bearer " + "a" * 5000,
    f"Bearer:{TEST_API_KEY}",
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_order_route_needs_a_key(http_server_client: Any, method: str, path: str) -> None:
    body = json.dumps(VALID_ORDER) if method == "POST" else None
    response, answer = await fetch(http_server_client, path, None, method=method, body=body)
    assert response.code == 401 and answer["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="orders"'
    for value in NOT_BEARER:
        response, answer = await fetch(http_server_client, path, None, method=method, body=body,
                                       headers={"Authorization": value})
        assert response.code == 401, (value, answer)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="orders"', value
    for value in MALFORMED:
        response, answer = await fetch(http_server_client, path, None, method=method, body=body,
                                       headers={"Authorization": value})
        assert response.code == 401, (value, answer)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="orders", error="invalid_request"'
    unknown = "oek_0123456789abcdef_" + "x" * 43
    response, answer = await fetch(http_server_client, path, unknown, method=method, body=body)
    assert response.code == 401 and answer["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="orders", error="invalid_token"'


async def test_two_authorization_lines_are_refused(http_server_client: Any, redis: Redis) -> None:
    port = port_of(http_server_client)
    body = json.dumps(VALID_ORDER).encode()
    request = (f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {TEST_API_KEY}\r\nAuthorization: Bearer {TEST_API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    status, head, answer = await raw_http("127.0.0.1", port, request, api_key=None)
    assert status == 401 and 'error="invalid_request"' in head["www-authenticate"], answer
    assert await redis.keys("order:*") == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_scheme_is_case_insensitive(http_server_client: Any, scheme: str) -> None:
    response, body = await post_order(http_server_client, headers={"Authorization": f"{scheme} {TEST_API_KEY}"})
    assert response.code == 202, body


async def test_a_revoked_key_is_refused_from_its_next_call(http_server_client: Any, services: Services) -> None:
    key = await new_key(services, "carol")
    order_id = await place(http_server_client, key)
    await services.api_keys.revoke("carol")
    for method, path in [("GET", f"/api/orders/{order_id}"), ("POST", "/api/orders/execute"),
                         ("GET", "/api/orders")]:
        body = json.dumps(VALID_ORDER) if method == "POST" else None
        response, answer = await fetch(http_server_client, path, key, method=method, body=body)
        assert response.code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    records = {record.name: record for record in await services.api_keys.records()}
    assert records["carol"].revoked_at is not None


async def test_failed_authentications_are_limited_per_address(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconfigure(services, monkeypatch, auth_failure_burst=3, auth_failure_interval_secs=60.0)
    wrong = "oek_7e57000000000001_" + "W" * 43  # the test key's id, another secret
    codes = [(await fetch(http_server_client, "/api/orders", wrong))[0].code for _ in range(3)]
    assert codes == [401, 401, 401]
    for _ in range(3):  # from now on the address's failed attempts are refused outright
        response, body = await fetch(http_server_client, "/api/orders", wrong)
        assert response.code == 429 and body["error"] == "rate_limited", body
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    response, body = await post_order(http_server_client, headers=bearer(wrong))
    assert response.code == 429
    # A good key from the same address still passes: one client's guessing must not
    # lock out the others behind its address (a NAT, a proxy).
    assert (await fetch(http_server_client, "/api/orders", TEST_API_KEY))[0].code == 200
    assert (await post_order(http_server_client))[0].code == 202
    # A request without a key, or with a malformed one, guesses nothing: still 401.
    assert (await fetch(http_server_client, "/api/orders", None))[0].code == 401


# -- rate limits ---------------------------------------------------------------------------


async def test_a_keys_rate_limit_allows_its_burst_then_429(
    http_server_client: Any, services: Services, redis: Redis
) -> None:
    key = await new_key(services, "dave", rate=0.01, burst=4)
    seen = []
    for _ in range(4):
        response, body = await post_order(http_server_client, headers=bearer(key))
        assert response.code == 202, body
        assert response.headers["RateLimit-Policy"] == '"per-key";q=4;w=400'
        seen.append(response.headers["RateLimit"])
    assert [int(re.search(r";r=(\d+);", value).group(1)) for value in seen] == [3, 2, 1, 0]  # type: ignore[union-attr]
    refused, body = await post_order(http_server_client, headers=bearer(key))
    assert refused.code == 429 and body["error"] == "rate_limited"
    assert 90 <= int(refused.headers["Retry-After"]) <= 100  # one call per 100 s
    assert refused.headers["RateLimit"].startswith('"per-key";r=0;')
    assert len(await redis.keys("order:*:events")) == 4  # the refused one created nothing
    # Reads count too, and the other keys are untouched.
    assert (await fetch(http_server_client, "/api/orders", key))[0].code == 429
    assert (await fetch(http_server_client, "/api/orders", TEST_API_KEY))[0].code == 200


async def test_the_default_limit_comes_from_the_config(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ways in: the authorize step of a read, and the create script of a POST.
    reconfigure(services, monkeypatch, rate_limit_per_sec=0.5, rate_limit_burst=2)
    key = await new_key(services, "erin")
    codes = [(await fetch(http_server_client, "/api/orders", key))[0].code for _ in range(3)]
    assert codes == [200, 200, 429]
    other = await new_key(services, "erin2")
    codes = [(await post_order(http_server_client, headers=bearer(other)))[0].code for _ in range(3)]
    assert codes == [202, 202, 429]


# -- backpressure --------------------------------------------------------------------------


async def test_posts_are_503_overloaded_while_the_queue_is_full(
    http_server_client: Any, services: Services, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconfigure(services, monkeypatch, max_queue_lag=3)
    first = await place(http_server_client, TEST_API_KEY, **{"Idempotency-Key": "k1"})
    for _ in range(2):
        await place(http_server_client, TEST_API_KEY)
    response, body = await post_order(http_server_client)
    assert response.code == 503 and body["error"] == "overloaded", body
    assert response.headers["Retry-After"] == "2"
    assert await redis.xlen(keys.ORDERS_STREAM) == 3  # nothing created
    # A retry of an order that exists is answered: it creates nothing.
    replay, body = await post_order(http_server_client, headers={"Idempotency-Key": "k1"})
    assert replay.code == 202 and body["order_id"] == first
    # Orders a worker has taken (pending in the group) are not waiting.
    await redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0")
    await redis.xreadgroup(keys.EXECUTORS_GROUP, "w1", {keys.ORDERS_STREAM: ">"}, count=1)
    response, body = await post_order(http_server_client)
    assert response.code == 202, body


# -- GET /api/orders -----------------------------------------------------------------------


async def test_the_list_is_newest_first_in_pages_that_hold_while_orders_arrive(
    http_server_client: Any, services: Services
) -> None:
    key = await new_key(services, "frank")
    placed = [await place(http_server_client, key) for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        path = "/api/orders?limit=3" + (f"&cursor={cursor}" if cursor else "")
        response, page = await fetch(http_server_client, path, key)
        assert response.code == 200, page
        seen += [order["order_id"] for order in page["orders"]]
        assert all("history" not in order for order in page["orders"])
        if len(seen) == 3:  # a new order between pages shifts nothing
            placed_later = await place(http_server_client, key)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == placed[::-1]
    first_page = (await fetch(http_server_client, "/api/orders?limit=1", key))[1]
    assert [order["order_id"] for order in first_page["orders"]] == [placed_later]


async def test_the_list_filters_by_status(http_server_client: Any, services: Services) -> None:
    key = await new_key(services, "grace")
    placed = [await place(http_server_client, key) for _ in range(5)]
    for order_id in placed[1::2]:
        await drive_to_confirmed(services.store, order_id)
    confirmed = (await fetch(http_server_client, "/api/orders?status=confirmed", key))[1]
    pending = (await fetch(http_server_client, "/api/orders?status=pending&limit=100", key))[1]
    assert [o["order_id"] for o in confirmed["orders"]] == placed[1::2][::-1]
    assert [o["order_id"] for o in pending["orders"]] == placed[0::2][::-1]
    assert confirmed["next_cursor"] is None and pending["next_cursor"] is None
    assert {o["status"] for o in confirmed["orders"]} == {"confirmed"}


async def test_the_list_drops_orders_that_expired(
    http_server_client: Any, services: Services, redis: Redis
) -> None:
    key = await new_key(services, "heidi")
    placed = [await place(http_server_client, key) for _ in range(3)]
    await redis.delete(keys.order(placed[1]))  # as its TTL would
    page = (await fetch(http_server_client, "/api/orders", key))[1]
    assert [o["order_id"] for o in page["orders"]] == [placed[2], placed[0]]
    assert await redis.xlen(keys.key_orders(key_id_of(key))) == 2


@pytest.mark.parametrize("cursor", ["0-0", "99999999999999999999-0", "1-99999999999999999999",
                                    "18446744073709551615-18446744073709551615", "00001-00"])
async def test_any_well_formed_cursor_gets_a_page(http_server_client: Any, services: Services, cursor: str) -> None:
    key = await new_key(services, "judy")
    placed = await place(http_server_client, key)
    response, page = await fetch(http_server_client, f"/api/orders?cursor={cursor}", key)
    assert response.code == 200, page
    newest_first = cursor.startswith(("9", "1-9", "18446744073709551615"))
    assert [o["order_id"] for o in page["orders"]] == ([placed] if newest_first else [])


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=101", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"),
     ("limit=%C2%B2", "limit"), ("status=done", "status"), ("cursor=abc", "cursor"),
     ("cursor=1-2-3", "cursor"), ("limit=1&limit=2", "limit"), ("page=2", "page")],
)
async def test_a_bad_query_is_a_400_naming_the_parameter(
    http_server_client: Any, query: str, field: str
) -> None:
    response, body = await fetch(http_server_client, f"/api/orders?{query}", TEST_API_KEY)
    assert response.code == 400 and body["error"] == "bad_request", body
    assert [detail["field"] for detail in body["details"]] == [field]


# -- the status WebSocket ------------------------------------------------------------------


async def test_an_account_feed_streams_all_of_its_keys_orders_and_nothing_else(
    http_server_client: Any, services: Services
) -> None:
    alice, bob = await new_key(services, "alice"), await new_key(services, "bob")
    feed = await account_feed(http_server_client, alice)
    hello = json.loads(await asyncio.wait_for(feed.read_message(), 10) or "{}")
    assert hello == {"subscribed": "orders", "key_id": key_id_of(alice)}
    bobs = await place(http_server_client, bob)
    mine = [await place(http_server_client, alice) for _ in range(2)]
    await drive_to_confirmed(services.store, bobs)
    for order_id in mine:
        await drive_to_confirmed(services.store, order_id)
    messages: list[dict[str, Any]] = []
    while len(messages) < 10:
        messages.append(json.loads(await asyncio.wait_for(feed.read_message(), 10) or "{}"))
    for order_id in mine:
        assert [m["status"] for m in messages if m["order_id"] == order_id] == [
            "pending", "routing", "building", "submitted", "confirmed"]
    assert all(m["order_id"] != bobs for m in messages)
    feed.close()
    # The seed's protocol still works for anyone holding an order id (a capability).
    ws = await websocket_connect(http_server_client.get_url("/api/orders/status").replace("http", "ws"))
    await ws.write_message(bobs)
    assert [json.loads(m)["status"] for m in await read_until_closed(ws)][-1] == "confirmed"


@pytest.mark.parametrize(
    ("message", "code"),
    [("Bearer nope", 4401), ("bearer oek_0123456789abcdef_" + "x" * 43, 4401), ("Bearer ", 4401)],
)
async def test_an_account_feed_needs_a_live_key(http_server_client: Any, message: str, code: int) -> None:
    url = http_server_client.get_url("/api/orders/status").replace("http://", "ws://")
    ws = await websocket_connect(HTTPRequest(url))
    await ws.write_message(message)
    answers = await read_until_closed(ws)
    assert json.loads(answers[0])["error"] == "unauthorized"
    assert ws.close_code == code


async def test_an_account_feed_closes_when_its_key_is_revoked(
    http_server_client: Any, services: Services
) -> None:
    feed = await subscribed_feed(http_server_client, services, "ivan")
    await services.api_keys.revoke("ivan")
    rest = await read_until_closed(feed, timeout=10)
    assert json.loads(rest[-1])["error"] == "unauthorized"
    assert feed.close_code == 4401


# -- AUTH=off ------------------------------------------------------------------------------


async def test_with_auth_off_no_key_is_asked_for(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconfigure(services, monkeypatch, auth=False)
    response, body = await fetch(http_server_client, "/api/orders/execute", None, method="POST",
                                 body=json.dumps(VALID_ORDER), headers={"Content-Type": "application/json"})
    assert response.code == 202 and "RateLimit" not in response.headers
    order_id = body["order_id"]
    assert (await fetch(http_server_client, f"/api/orders/{order_id}", None))[0].code == 200
    listed = (await fetch(http_server_client, "/api/orders", None))[1]
    assert [o["order_id"] for o in listed["orders"]] == [order_id]
    assert (await services.store.get(order_id)).owner == accounts.ANONYMOUS  # type: ignore[union-attr]


def test_auth_and_the_limits_are_read_from_the_environment() -> None:
    config = Config.from_env({"AUTH": "off", "RATE_LIMIT_PER_SEC": "2.5", "RATE_LIMIT_BURST": "7",
                              "AUTH_FAILURE_BURST": "4", "AUTH_FAILURE_INTERVAL_SECS": "30",
                              "MAX_QUEUE_LAG": "0"})
    assert (config.auth, config.rate_limit_per_sec, config.rate_limit_burst) == (False, 2.5, 7)
    assert (config.auth_failure_burst, config.auth_failure_interval_secs, config.max_queue_lag) == (4, 30.0, 0)
    assert Config.from_env({}).auth is True


# -- the key store -------------------------------------------------------------------------


async def test_keys_are_random_stored_as_digests_and_listed_without_them(
    services: Services, redis: Redis
) -> None:
    made = [await services.api_keys.create("same-name") for _ in range(2)]
    assert len(set(made)) == 2
    for key in made:
        parsed = accounts.Credentials.parse(key)
        assert parsed is not None and len(key) == 64
        record = await redis.hgetall(keys.api_key(parsed.key_id))
        assert key not in json.dumps(record) and record["digest"] == accounts.key_digest(key)
    with pytest.raises(accounts.ApiKeyError, match="2 live keys are named"):
        await services.api_keys.revoke("same-name")
    with pytest.raises(accounts.ApiKeyError):
        await services.api_keys.create("no spaces")
    with pytest.raises(accounts.ApiKeyError):
        await services.api_keys.revoke("nobody")
    assert await services.api_keys.is_live(made[0])
    assert not await services.api_keys.is_live(made[0][:-1] + "x")


async def test_the_dev_key_file_is_made_once_and_remade_when_its_key_is_gone(
    config: Config, services: Services, redis: Redis
) -> None:
    from engine.ops.api_keys import ensure_dev_key

    assert config.redis_url is not None
    path, made = await ensure_dev_key(config, config.redis_url)
    key = path.read_text().strip()
    assert made and path.stat().st_mode & 0o777 == 0o600 and await services.api_keys.is_live(key)
    assert await ensure_dev_key(config, config.redis_url) == (path, False)
    assert path.read_text().strip() == key
    await services.api_keys.revoke(key_id_of(key))
    path, made = await ensure_dev_key(config, config.redis_url)
    assert made and path.read_text().strip() != key


async def test_a_confirmed_orders_events_carry_their_owner(
    http_server_client: Any, services: Services, redis: Redis
) -> None:
    order_id = await place(http_server_client, TEST_API_KEY)
    await drive_to_confirmed(services.store, order_id)
    entries = await redis.xrange(keys.EVENTS_STREAM)
    assert {fields["owner"] for _id, fields in entries} == {key_id_of(TEST_API_KEY)}
    await eventually(lambda: True)
    assert OrderStatus.CONFIRMED in {json.loads(fields["data"])["status"] for _id, fields in entries}


# -- found by the hostile review --------------------------------------------------------------


async def test_the_policy_states_the_sustained_rate(http_server_client: Any, services: Services) -> None:
    # q calls per w seconds is the rate, and q is at least the burst.
    for (rate, burst), policy in {(5, 1): "q=5;w=1", (2, 3): "q=4;w=2", (20, 40): "q=40;w=2",
                                  (0.01, 4): "q=4;w=400"}.items():
        key = await new_key(services, "policy", rate=rate, burst=burst)
        response, _ = await fetch(http_server_client, "/api/orders", key)
        assert response.headers["RateLimit-Policy"] == f'"per-key";{policy}', (rate, burst)


async def test_a_keys_own_limits_are_bounded(services: Services) -> None:
    for limits in ({"rate": 1e-300}, {"rate": 1e7}, {"rate": float("nan")}, {"burst": 0},
                   {"burst": 10**23}):
        with pytest.raises(accounts.ApiKeyError):
            await services.api_keys.create("bounded", **limits)
    for name, value in (("RATE_LIMIT_PER_SEC", "1e-9"), ("RATE_LIMIT_BURST", "10000001"),
                        ("AUTH_FAILURE_INTERVAL_SECS", "1e300")):
        with pytest.raises(ConfigError, match=name):
            Config.from_env({name: value})


async def test_a_key_stored_again_starts_afresh(services: Services) -> None:
    key = await services.api_keys.create("again", rate=1.0, burst=1)
    await services.api_keys.revoke("again")
    assert await services.api_keys.create("again", key=key) == key
    assert await services.api_keys.is_live(key)
    (record,) = [r for r in await services.api_keys.records() if r.name == "again"]
    assert (record.rate, record.burst, record.revoked_at) == (None, None, None)


async def test_the_last_full_page_has_no_next_cursor(http_server_client: Any, services: Services) -> None:
    key = await new_key(services, "kim")
    for _ in range(4):
        await place(http_server_client, key)
    first = (await fetch(http_server_client, "/api/orders?limit=2", key))[1]
    last = (await fetch(http_server_client, f"/api/orders?limit=2&cursor={first['next_cursor']}", key))[1]
    assert len(first["orders"]) == len(last["orders"]) == 2
    assert first["next_cursor"] is not None and last["next_cursor"] is None


async def test_expired_orders_leave_a_keys_list_even_if_it_never_lists(
    http_server_client: Any, services: Services, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Orders that never finish stay listed however old (no trim by age: an unfinished
    # order never expires); expired ones leave the list, found by a prune that the
    # POSTs run every PRUNE_EVERY creates, outside the create script.
    from engine.core.store import PRUNE_EVERY

    key = await new_key(services, "leo")
    index = keys.key_orders(key_id_of(key))
    placed = [await place(http_server_client, key) for _ in range(3)]
    for gone in (placed[0], placed[2]):
        await redis.delete(keys.order(gone))  # as their TTL would
    # An order younger than the TTL cannot have expired: the prune does not look.
    assert await services.store.prune_key_orders(key_id_of(key)) == 0
    assert len(await redis.xrange(index)) == 3
    # Past the TTL (here: none), it does.
    store = services.store
    monkeypatch.setattr(store, "config", dataclasses.replace(store.config, order_ttl_secs=0))
    assert await services.store.prune_key_orders(key_id_of(key)) == 2
    assert [fields["id"] for _id, fields in await redis.xrange(index)] == [placed[1]]
    await redis.delete(keys.order(placed[1]))
    later = [await place(http_server_client, key) for _ in range(PRUNE_EVERY)]

    async def pruned() -> bool:
        return [fields["id"] for _id, fields in await redis.xrange(index)] == later

    await eventually(pruned, message="the prune after a POST")


async def test_the_feed_check_survives_an_error_reply(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = await subscribed_feed(http_server_client, services, "mia")
    real = services.api_keys.live_ids
    failures = [ResponseError("BUSY Redis is busy running a script")]

    async def busy_once(key_ids: list[str]) -> set[str]:
        if failures:
            raise failures.pop()
        return await real(key_ids)

    monkeypatch.setattr(services.api_keys, "live_ids", busy_once)
    await eventually(lambda: not failures, timeout=5, message="the check met the error")
    await services.api_keys.revoke("mia")
    rest = await read_until_closed(feed, timeout=10)
    assert json.loads(rest[-1])["error"] == "unauthorized" and feed.close_code == 4401


async def test_a_malformed_header_never_puts_a_key_in_the_log(
    http_server_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = port_of(http_server_client)
    secret = TEST_API_KEY.rsplit("_", 1)[1]
    for line in (f"Authorization: Bearer {TEST_API_KEY}\x00", f"Bearer {TEST_API_KEY}: x"):
        request = (f"GET /api/orders HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{line}\r\n\r\n").encode()
        status, _head, body = await raw_http("127.0.0.1", port, request, api_key=None)
        assert status == 400 and secret.encode() not in body
    assert "malformed request" in caplog.text and secret not in caplog.text


async def test_an_account_feed_keeps_deques_for_its_write_queues(
    http_server_client: Any, services: Services
) -> None:
    # An order's socket queues a few messages at most (lists: ws_protocol.ShortDeque);
    # an account feed may queue many for a slow client, and a list's popleft would make
    # draining them quadratic (found by review).
    import collections

    from handlers.ws_protocol import ShortDeque

    feed = await subscribed_feed(http_server_client, services, "nia")
    (handler,) = [h for h in services.open_sockets if h.feed is not None]
    stream = handler.ws_connection.stream
    assert isinstance(stream._write_futures, collections.deque)
    assert isinstance(stream._write_buffer._buffers, collections.deque)
    order_socket = [h for h in services.open_sockets if h.feed is None]
    for other in order_socket:
        assert isinstance(other.ws_connection.stream._write_futures, ShortDeque)
    feed.close()
