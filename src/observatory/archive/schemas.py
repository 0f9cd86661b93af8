"""Shapes of the /metadata replies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class FileOut(BaseModel):
    """One archived file of an observation."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: str
    size_bytes: int
    sha1: str
    coarse_chan: int | None
    batch: int | None


class ObservationOut(BaseModel):
    """An observation as the schedule records it."""

    model_config = ConfigDict(from_attributes=True)

    obsid: int
    stoptime: int
    exposure_s: int
    obsname: str
    creator: str
    project_id: str
    mode: str
    groupid: int | None
    ra_deg: float | None
    dec_deg: float | None
    ra_phase_deg: float | None
    dec_phase_deg: float | None
    az_deg: float | None
    el_deg: float | None
    delays: list[int]
    coarse_chans: list[int]
    n_tiles: int | None
    freq_res_khz: float | None
    int_time_s: float | None
    atten_db: float | None
    calibration: bool
    calibrator_source: str | None
    #: False when no trigger may interrupt it (an operator's ``--not-interruptible``).
    interruptible: bool
    #: With subarrays: each subarray's target and pointing (``subarray``, ``target``,
    #: ``az_deg``, ``el_deg``, ``delays``, ...; once recorded, ``recorded_tile_ids``: the
    #: tiles of it the metafits holds); null for an observation of the whole array.
    subarray_pointings: list[dict[str, Any]] | None
    deleted: bool
    created_by: str
    created_at: datetime


class ObservationDetail(ObservationOut):
    """An observation with its files."""

    files: list[FileOut]
    total_size_bytes: int
