"""API keys on the order routes: ``Authorization: Bearer <key>`` (RFC 6750 section 2.1).

A request with no key, or one not shaped like a key, is answered 401 here without
asking Redis. A well-formed key is checked in Redis, in the same atomic step as the
rate limit and, for POST, as the create itself (engine.core.accounts).
"""

from __future__ import annotations

import re

from tornado.httputil import HTTPServerRequest
from typing_extensions import override

from engine.core.accounts import ANONYMOUS, Authorization, Credentials
from handlers.base import APIError, APIHandler, ErrorCode

# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token; the scheme is
# case-insensitive (RFC 9110 section 11.1). Tornado joins a header sent twice with a
# comma, which no b64token holds: a second Authorization line is malformed.
BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*)")
REALM = 'Bearer realm="orders"'


def unauthorized(message: str, error: str | None = None) -> APIError:
    """A 401 with its WWW-Authenticate challenge (RFC 6750 section 3): no error code
    when the request had no credentials (or another scheme's), ``invalid_request``
    for a malformed Bearer header, ``invalid_token`` for a key that is unknown or
    revoked."""
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    return APIError(401, ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": challenge})


def bearer_credentials(text: str) -> Credentials | None:
    """The API key in ``Bearer <key>`` (an Authorization value, or the account feed's
    first message), or None when ``text`` is not that shape."""
    match = BEARER.fullmatch(text)
    return Credentials.parse(match.group(1)) if match else None


def credentials(request: HTTPServerRequest) -> Credentials:
    """The request's API key; raises APIError 401 when it has none or a malformed one."""
    lines = request.headers.get_list("Authorization")
    if not lines or (len(lines) == 1 and not lines[0][:7].lower().startswith("bearer")):
        # No credentials, or another scheme's (Basic...): RFC 6750 section 3.1 says a
        # challenge with no error code.
        raise unauthorized("send your API key: Authorization: Bearer <key>")
    parsed = bearer_credentials(lines[0]) if len(lines) == 1 else None
    if parsed is None:
        raise unauthorized(
            "the Authorization header must be sent once, as Bearer and an API key (oek_...)",
            "invalid_request",
        )
    return parsed


def client_address(request: HTTPServerRequest) -> str:
    """Whose failed attempts a request counts toward: its peer's address (the
    proxy's X-Forwarded-For only with TRUST_PROXY_HEADERS)."""
    return request.remote_ip or "unknown"


def refusal(authorization: Authorization) -> APIError | None:
    """The answer to a refused authorize step, or None when it passed."""
    outcome = authorization.outcome
    if outcome == "unauthorized":
        return unauthorized("this API key is unknown or revoked", "invalid_token")
    if outcome == "throttled":
        return APIError(
            429, ErrorCode.RATE_LIMITED,
            "too many failed authentications from this address: wait Retry-After seconds",
            headers={"Retry-After": str(authorization.retry_after_secs)},
        )
    if outcome == "rate_limited":
        return APIError(
            429, ErrorCode.RATE_LIMITED,
            "this API key's rate limit is reached: wait Retry-After seconds",
            headers={"Retry-After": str(authorization.retry_after_secs)},
        )
    return None


class AccountHandler(APIHandler):
    """An order route: answered only for a valid API key (unless AUTH=off), and only
    about that key's own orders.

    ``prepare`` reads the key (401 without a well-formed one); the handler then either
    calls ``authorize()`` (one Redis step: the key, its rate limit) or passes
    ``self.credentials`` to a store call that authorizes in its own step (the create
    script), and hands its answer to ``apply_authorization``.
    """

    # None with AUTH=off.
    credentials: Credentials | None = None

    @override
    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "OPTIONS":  # a CORS preflight carries no credentials
            return
        if self.services.config.auth:
            self.credentials = credentials(self.request)

    @property
    def owner(self) -> str:
        """The id of the API key making this request (what its orders are owned by)."""
        return self.credentials.key_id if self.credentials is not None else ANONYMOUS

    def may_see(self, owner: str | None) -> bool:
        """Whether this request may see an order owned by ``owner``: its own, or any
        with AUTH=off."""
        return self.credentials is None or owner == self.credentials.key_id

    async def authorize(self) -> None:
        """Check the key and take one call of its rate limit (in Redis); raises
        APIError 401 or 429. With AUTH=off, nothing."""
        if self.credentials is None:
            return
        async with self.redis_guard():
            result = await self.services.api_keys.authorize(
                self.credentials, client_address(self.request)
            )
        self.apply_authorization(result)

    def apply_authorization(self, authorization: Authorization) -> None:
        """Put the key's RateLimit headers on the answer (error answers included);
        raise the refusal, if it was one."""
        if authorization.rate_limit is not None:
            self.keep_headers(authorization.rate_limit.headers())
        refused = refusal(authorization)
        if refused is not None:
            raise refused
