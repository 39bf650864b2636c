"""The OpenAPI document, made to say what this server does with its settings."""

from typing import Any

from fastapi import FastAPI


def without_security(document: dict[str, Any]) -> dict[str, Any]:
    """The document without bearer auth: a server without keys asks for none, so it must not declare it."""
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    components = document.get("components", {})
    components.pop("securitySchemes", None)
    return document


def install(app: FastAPI, keys_enabled: bool) -> None:
    if keys_enabled:
        return
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = without_security(generate())
        return app.openapi_schema

    app.openapi = openapi
