"""FastAPI dependencies: the runtime, and the optional bearer-token check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from service.runtime.lifecycle import Runtime

_bearer = HTTPBearer(auto_error=False, description="the value of CSIST_API_TOKEN, when set")


async def get_runtime(conn: HTTPConnection) -> Runtime:
    """The app's runtime (async: sync dependencies would each cost a thread-pool hop)."""
    return conn.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def token_ok(runtime: Runtime, header_token: str | None, query_token: str | None) -> bool:
    """True when no token is configured, or one of the given tokens matches it."""
    expected = runtime.settings.api_token
    if expected is None:
        return True
    want = expected.get_secret_value().encode()
    return any(t is not None and secrets.compare_digest(t.encode(), want) for t in (header_token, query_token))


def bearer_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_token(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Query(description="the API token, for clients that cannot set headers")] = None,
) -> None:
    """401 unless the request carries the configured token (header or ``?token=``)."""
    header_token = credentials.credentials if credentials is not None else None
    if not token_ok(runtime, header_token, token):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API token: send 'Authorization: Bearer <token>' or ?token=",
            headers={"WWW-Authenticate": "Bearer"},
        )
