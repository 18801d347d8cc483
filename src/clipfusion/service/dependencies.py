"""FastAPI dependencies: the service state, a database session, and who is asking (API key and role)."""
from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from clipfusion.service.errors import ServiceError
from clipfusion.service.settings import ApiKey
from clipfusion.service.state import ServiceState

# Without --api-key-file nobody is asked for a key, and everyone may do everything.
NOBODY = ApiKey(name="", role="admin", secret="")


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


def require_api_key(request: Request, state: StateDep) -> ApiKey:
    """With ``--api-key-file``, every /v1 request needs ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``
    (the scheme in any case).  The acting key, also kept as ``request.state.actor`` for the log."""
    keys = state.settings.api_keys
    if not keys:
        return NOBODY
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    given = (request.headers.get("x-api-key") or (credentials.strip() if scheme.lower() == "bearer" else "")).encode()
    # compare with every key, each in constant time: the answer's timing says nothing about a key
    matches = [key for key in keys if hmac.compare_digest(given, key.secret.encode())]
    if not matches:
        raise ServiceError(401, "unauthorized", "a valid API key is needed (header X-API-Key or Authorization: "
                                                "Bearer)", headers={"WWW-Authenticate": "Bearer"})
    request.state.actor = matches[0].name
    return matches[0]


ActorDep = Annotated[ApiKey, Depends(require_api_key)]


def require_admin(actor: ActorDep) -> ApiKey:
    """Changing a model (learning, rollback) needs an admin key."""
    if actor.role != "admin":
        raise ServiceError(403, "forbidden", f"key {actor.name!r} is an operator key: learning and rollback need an "
                                             "admin key (--api-key-file: NAME admin KEY)")
    return actor


AdminDep = Annotated[ApiKey, Depends(require_admin)]
