"""A subarray observation is recorded with the tiles of its subarrays, each tile pointed as
its subarray was, and its record (/metadata/obs) agrees with its metafits.

The simulated telescope recorded the first ``telescope_tiles`` tiles of the layout whatever
the subarrays (all of them in ``all_west``: an ``all_east`` trigger was archived with every
dipole off), and the metafits ``DELAYS`` were the first recorded tile's, so a trigger on
``all_east`` and ``all_west`` said the first target's RA/Dec beside the second's delays.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive import runner, simulated
from observatory.archive.models import Observation
from observatory.core.accounts import create_project
from observatory.core.config import Settings
from observatory.telescope import instrument, sky
from observatory.trigger import service

observe_due = partial(runner.observe_due, buffer_dumps=service.buffer_dumps)
NOON = 1_450_324_818  # a fixed time, so the pointings are the same on every run


def _trigger_subarrays(
    session_factory: sessionmaker[Session],
    settings: Settings,
    subarrays: list[str],
    ra_offsets_deg: list[float],
) -> int:
    """Trigger one 8-s correlator observation of targets near the meridian, one per
    subarray; return its obsid."""
    lst = float(sky.local_apparent_sidereal_deg([NOON])[0])
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="subarray-key-1")
        session.commit()
        result = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": "subarray-key-1", "pretend": "false",
            "ra": json.dumps([(lst + offset) % 360 for offset in ra_offsets_deg]),
            "dec": -26.7, "nobs": 1, "exptime": 8, "freqspecs": "121,1",
            "subarrays": json.dumps(subarrays),
        }, vcs=False, now=NOON)  # fmt: skip
    assert result["success"] is True, result["errors"]
    (obsid,) = result["obsid_list"]
    return obsid


def _metadata(settings: Settings, obsid: int) -> dict[str, Any]:
    with TestClient(create_app(settings)) as client:
        reply = client.get("/metadata/obs", params={"obs_id": str(obsid)})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


@pytest.mark.parametrize(
    ("subarrays", "ra_offsets_deg"),
    [
        (["all_east"], [10.0]),
        (["all_east", "all_west"], [20.0, -20.0]),
        (["all_west", "all_ne"], [-20.0, 20.0]),
        (["all_nw", "all_ne", "all_sw", "all_se"], [-20.0, 20.0, -10.0, 10.0]),
    ],
)
def test_a_subarray_observation_records_its_subarrays_tiles_and_pointings(
    settings: Settings,
    session_factory: sessionmaker[Session],
    subarrays: list[str],
    ra_offsets_deg: list[float],
) -> None:
    obsid = _trigger_subarrays(session_factory, settings, subarrays, ra_offsets_deg)
    assert observe_due(session_factory, settings, now=obsid + 9, limit=5) == [obsid]
    record = _metadata(settings, obsid)
    pointings = record["subarray_pointings"]
    assert [p["subarray"] for p in pointings] == subarrays
    scheduled = {p["subarray"]: p["delays"] for p in pointings}
    assert len({tuple(d) for d in scheduled.values()}) == len(subarrays)  # pointed apart

    metafits = Path(settings.archive_dir) / str(obsid) / f"{obsid}.metafits"
    header = fits.getheader(metafits)
    tiledata = fits.getdata(metafits, 1)
    layout_index = {t.tile_id: i for i, t in enumerate(instrument.tile_layout())}
    members = instrument.subarray_tiles()
    tiles_of: dict[str, set[int]] = {name: set() for name in subarrays}
    for tile_id, delays in zip(tiledata["Tile"], tiledata["Delays"], strict=True):
        # Every recorded tile is in exactly one of the subarrays asked for, pointed as it was.
        (subarray,) = [n for n in subarrays if layout_index[int(tile_id)] in members[n]]
        assert list(delays) == scheduled[subarray]
        tiles_of[subarray].add(int(tile_id))
    # Each subarray is recorded, with an equal share of the telescope's tiles.
    n_recorded = len(tiledata) // 2
    assert n_recorded == settings.telescope_tiles
    assert {len(t) for t in tiles_of.values()} == {settings.telescope_tiles // len(subarrays)}

    # The header's pointing is the first subarray's throughout: RA/Dec, Az/Alt and DELAYS.
    first = pointings[0]
    assert header["DELAYS"] == ",".join(map(str, first["delays"]))
    assert (header["RA"], header["DEC"]) == pytest.approx((first["ra_deg"], first["dec_deg"]))
    assert (header["RAPHASE"], header["DECPHASE"]) == pytest.approx(
        (first["ra_phase_deg"], first["dec_phase_deg"])
    )
    assert (header["AZIMUTH"], header["ALTITUDE"]) == pytest.approx(
        (first["az_deg"], first["el_deg"]), abs=0.01
    )

    # The record says what the metafits says, and which tiles each subarray recorded.
    assert record["n_tiles"] == n_recorded == header["NINPUTS"] // 2
    assert record["delays"] == [int(d) for d in header["DELAYS"].split(",")]
    assert (record["ra_deg"], record["dec_deg"]) == (header["RA"], header["DEC"])
    assert (record["az_deg"], record["el_deg"]) == (header["AZIMUTH"], header["ALTITUDE"])
    assert {p["subarray"]: set(p["recorded_tile_ids"]) for p in pointings} == tiles_of


def test_a_tile_has_the_same_gains_whichever_tiles_it_is_recorded_with() -> None:
    """A subarray's tiles are not the layout's first: their injected gains are still each
    tile's own, so a calibrator observed by the whole array calibrates them."""
    whole_amplitudes, whole_delays_ns = simulated.instrument_gains(128, [133, 121])
    antennas = instrument.subarray_tiles()["all_east"][:8]
    amplitudes, delays_ns = simulated.instrument_gains(8, [121, 133], antennas=antennas)
    assert np.array_equal(amplitudes, whole_amplitudes[list(antennas)])
    assert np.array_equal(delays_ns, whole_delays_ns[list(antennas)])


def test_subarray_shares_give_every_subarray_tiles() -> None:
    pointings = [{"subarray": name} for name in ("all_nw", "all_ne", "all_sw", "all_se")]
    shares = simulated.subarray_shares(pointings, 6)
    assert [len(s) for s in shares] == [2, 2, 1, 1]
    # Fewer tiles than subarrays: still one each (a subarray without tiles has no data).
    assert [len(s) for s in simulated.subarray_shares(pointings, 1)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"subarray 'all_up' is not one of all_north"):
        simulated.subarray_shares([{"subarray": "all_up"}], 4)


def test_a_subarray_voltage_capture_is_sized_with_the_tiles_it_records() -> None:
    """The size limit (telescope_max_voltage_bytes) counted telescope_vcs_tiles (1) tiles,
    while a capture of four subarrays records one tile of each: four times as many bytes."""
    pointings = [{"subarray": name} for name in ("all_nw", "all_ne", "all_sw", "all_se")]
    start = NOON // 8 * 8
    capture = Observation(obsid=start, stoptime=start + 16, mode="MWAX_VCS",
                          coarse_chans=[121, 122], subarray_pointings=pointings)  # fmt: skip
    whole_array = Observation(obsid=start, stoptime=start + 16, mode="MWAX_VCS",
                              coarse_chans=[121, 122])  # fmt: skip
    assert simulated.voltage_bytes(capture, 1) == simulated.voltage_bytes(whole_array, 4)
    assert simulated.voltage_bytes(whole_array, 4) > simulated.voltage_bytes(whole_array, 1)
