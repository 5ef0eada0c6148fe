"""Dependencies of the job and data set routes: the admin key, the job settings and the store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from ..guard import check_key
from .settings import JobSettings
from .store import JobStore

ADMIN_FAILED = "missing or wrong admin key (X-Admin-Key; DPR_API_KEY does not open the training routes)"
admin_header = APIKeyHeader(name="X-Admin-Key", auto_error=False, scheme_name="AdminKey",
                            description="DPR_ADMIN_KEY: the job and data set routes (the query key never opens them)")


def require_admin(request: Request, key: Annotated[str | None, Depends(admin_header)]) -> None:
    """X-Admin-Key against DPR_ADMIN_KEY in constant time (the guard's own ``check_key``: both
    sides hashed, the digests compared); 401 otherwise. ``Authorization: Bearer`` is the query key's
    and never counts here. (With DPR_API_KEY set, the Guard wants that key on every route as well.)"""
    js: JobSettings = request.app.state.job_settings
    if js.admin_key is None or not check_key(js.admin_key.get_secret_value(), key or "", ""):
        raise HTTPException(401, ADMIN_FAILED, headers={"WWW-Authenticate": "X-Admin-Key"})


def job_settings(request: Request) -> JobSettings:
    """The training service's settings (:class:`JobSettings`)."""
    return request.app.state.job_settings


def job_store(request: Request) -> JobStore:
    """The job table (opened in the lifespan); 503 before it is."""
    store = getattr(request.app.state, "job_store", None)
    if store is None:
        raise HTTPException(503, "the training service is starting", headers={"Retry-After": "1"})
    return store


ADMIN_REQUIRED = Depends(require_admin)
AppJobSettings = Annotated[JobSettings, Depends(job_settings)]
Store = Annotated[JobStore, Depends(job_store)]


OTHER_METHODS = ["PUT", "PATCH", "OPTIONS", "TRACE"]


def allow_only(router: APIRouter, path: str, allowed: list[str]) -> None:
    """Answer the methods ``path`` lacks with 405 and ``Allow: <allowed>`` (every method of the
    path, where Starlette names only those of the first route matching it)."""

    async def not_allowed() -> None:
        raise HTTPException(405, "Method Not Allowed", headers={"Allow": ", ".join(allowed)})

    others = [m for m in ["GET", "POST", "DELETE", "HEAD", *OTHER_METHODS] if m not in allowed]
    router.add_api_route(path, not_allowed, methods=others, include_in_schema=False)
