"""AUTOMATIC1111's HTTP API (/sdapi/v1/...) over ldm_app.serving — being written (issue 18)."""

from __future__ import annotations

from typing import Any


def api_router(service: Any) -> Any:
    """A FastAPI APIRouter with the /sdapi/v1 routes, answered by `service` (a serving.GenerationService)."""
    from fastapi import APIRouter

    return APIRouter()
