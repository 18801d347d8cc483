"""FastAPI dependencies: the service state, a database session, and the API key check."""
from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from clipfusion.service.errors import ServiceError
from clipfusion.service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    if state.sessions is None:
        raise ServiceError(503, "not_ready", "the database is not open yet")
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_api_key(request: Request, state: StateDep) -> None:
    """With ``--api-key-file``, every /v1 request needs ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    keys = state.settings.api_keys
    if not keys:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    given = request.headers.get("x-api-key") or (credentials.strip() if scheme.lower() == "bearer" else "")
    # compare with every key in constant time: the answer's timing says nothing about a key
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise ServiceError(401, "unauthorized", "a valid API key is needed (header X-API-Key or Authorization: "
                                                "Bearer)", headers={"WWW-Authenticate": "Bearer"})
