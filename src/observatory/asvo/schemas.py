"""Shapes of the ASVO replies, as the clients decode them (specs/asvo.md section 3)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from observatory.asvo.models import JobState


class SubmitResponse(BaseModel):
    """A successful submission: only the job id (error keys would look like a refusal)."""

    job_id: int


class ProductFile(BaseModel):
    """One delivered file: a signed URL for acacia, a path for scratch and dug."""

    model_config = ConfigDict(extra="allow")

    type: Literal["acacia", "scratch", "dug"]
    size: int
    url: str | None = None
    sha1: str | None = None
    blake3: str | None = None
    path: str | None = None


class Product(BaseModel):
    files: list[ProductFile]


class JobRow(BaseModel):
    """``row`` of a get_jobs element or websocket frame."""

    id: int
    job_type: int
    job_state: JobState
    user_id: int
    job_params: dict[str, Any]
    error_code: int | None
    error_text: str | None
    created: str | None
    started: str | None
    completed: str | None
    product: Product | None


class JobEnvelope(BaseModel):
    """The change-feed envelope the clients expect around each row."""

    action: Literal["INSERT", "UPDATE", "DELETE"]
    table: Literal["jobs"]
    row: JobRow
