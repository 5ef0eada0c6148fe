"""The published OpenAPI schema: FastAPI's, plus the settings' limits and the API key scheme.

The schema must say exactly what the app accepts and answers (the schemathesis test in
``tests/test_reliability.py`` holds it to that, in both directions), so the limits from ``DPR_MAX_*``
and, when ``DPR_API_KEY`` is set, the key requirement of every route but the open ones are
written into it here.
"""

from __future__ import annotations

from fastapi import FastAPI

from .limits import document_limits

SECURITY_SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}


def with_api_key(security: list[dict] | None) -> list[dict]:
    """An operation's OpenAPI ``security`` with the API key required too: the key (X-API-Key or
    Bearer) and, combined with each, any requirement the route already has (the training routes'
    admin key), since OpenAPI ANDs the schemes of one entry and ORs the entries."""
    return [{**key, **other} for key in ({"APIKeyHeader": []}, {"Bearer": []}) for other in (security or [{}])]


def install_openapi(app: FastAPI, settings, open_routes: set[str]) -> None:
    """Make ``app.openapi()`` publish FastAPI's schema with the ``DPR_MAX_*`` limits of ``settings``
    (:func:`~dpr_service.api.limits.document_limits`) and, when a key is set, the key requirement of
    every route outside ``open_routes``. Generated once, on first use."""
    generate = app.openapi  # FastAPI's generator; it caches its result in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            document_limits(schema, settings)
            if settings.api_key is not None:
                schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
                for path, operations in schema["paths"].items():
                    if path not in open_routes:
                        for operation in operations.values():
                            operation["security"] = with_api_key(operation.get("security"))
        return app.openapi_schema

    app.openapi = openapi
