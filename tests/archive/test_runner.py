"""The simulated telescope records triggered observations once they end; ASVO can then serve them."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive import runner
from observatory.archive.models import FileKind, Observation
from observatory.archive.runner import DUMP_SETTLE_S
from observatory.archive.service import schedule_observation
from observatory.core.accounts import create_project, create_user
from observatory.core.config import Settings
from observatory.telescope import instrument, sky
from observatory.trigger import service

observe_due = partial(runner.observe_due, buffer_dumps=service.buffer_dumps)
NOON = 1_450_324_818  # a fixed time, so the pointing is the same on every run


def test_triggered_observations_are_recorded_and_can_be_ordered(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    lst = float(sky.local_apparent_sidereal_deg([NOON])[0])
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        create_user(session, "dora", "runner-api-key")
        session.commit()
        result = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false", "ra": lst,
            "dec": -26.7, "nobs": 1, "exptime": 8, "freqspecs": "121,2", "calibrator": "true",
            "calexptime": 8, "obsname": "runner test", "atten": 10,
        }, vcs=False, now=NOON)  # fmt: skip
    assert result["success"] is True, result["errors"]
    target_id, calibrator_id = result["obsid_list"]

    settings = settings.model_copy(update={"telescope_tiles": 4})
    assert (
        observe_due(session_factory, settings, now=target_id + 4, limit=10) == []
    )  # still observing
    assert observe_due(session_factory, settings, now=calibrator_id + 8, limit=10) == [
        target_id,
        calibrator_id,
    ]
    assert (
        observe_due(session_factory, settings, now=calibrator_id + 8, limit=10) == []
    )  # once only

    with session_factory() as session:
        target = session.get(Observation, target_id)
        calibrator = session.get(Observation, calibrator_id)
        assert target is not None and calibrator is not None
        kinds = sorted(f.kind for f in target.files)
        assert kinds.count("mwax_vis") == 2 and "metafits" in kinds
        assert (target.n_tiles, target.freq_res_khz, target.int_time_s) == (4, 40.0, 2.0)
        assert target.obsname == "runner test" and target.project_id == "G0055"
        metafits = Path(settings.archive_dir) / str(calibrator_id) / f"{calibrator_id}.metafits"
        header = fits.getheader(metafits)
        assert header["GPSTIME"] == calibrator_id and header["CALIBRAT"]
        # Pointed at a beamformer sweet spot near the target, phased to the target itself;
        # the metafits used to say the sweet spot (conversions were phased 3 degrees off).
        target_header = fits.getheader(
            Path(settings.archive_dir) / str(target_id) / f"{target_id}.metafits"
        )
        assert (target.ra_phase_deg, target.dec_phase_deg) == pytest.approx((lst, -26.7))
        phase_centre = (target_header["RAPHASE"], target_header["DECPHASE"])
        assert phase_centre == pytest.approx((lst, -26.7))
        assert (target_header["RA"], target_header["DEC"]) != pytest.approx(phase_centre)
        assert target_header["CREATOR"] == target.creator != "simulator"
        # The tiles as scheduled: the sweet spot's delays and the attenuation asked for.
        assert target_header["DELAYS"] == ",".join(map(str, target.delays))
        assert target_header["ATTEN_DB"] == target.atten_db == 10
        assert header["CALIBSRC"] == result["params"]["calname"] == calibrator.calibrator_source

    # The recorded observation is an archive observation like any other: ASVO delivers it.
    with TestClient(create_app(settings, run_jobs=True)) as client:
        assert (
            client.post(
                "/api/api_login", auth=("mantaray-clientv2.0", "runner-api-key")
            ).status_code
            == 200
        )
        job = client.post(
            "/api/download_vis_job", data={"obs_id": str(target_id), "download_type": "vis"}
        )
        assert job.status_code == 200, job.text
        deadline = time.monotonic() + 120
        while True:
            (row,) = [e["row"] for e in client.get("/api/get_jobs").json()]
            if row["job_state"] in ("completed", "error"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert row["job_state"] == "completed", row["error_text"]
    assert row["product"]["files"][0]["size"] > 0


def test_a_subarray_observation_records_each_tiles_own_pointing(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """The metafits showed the first subarray's pointing on every tile."""
    lst = float(sky.local_apparent_sidereal_deg([NOON])[0])
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        session.commit()
        result = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false",
            "ra": json.dumps([(lst + 20) % 360, (lst - 20) % 360]), "dec": -26.7, "nobs": 1,
            "exptime": 8, "freqspecs": "121,1", "subarrays": '["all_north", "all_south"]',
            "calibrator": "true", "calexptime": 8,
        }, vcs=False, now=NOON)  # fmt: skip
    assert result["success"] is True, result["errors"]
    obsid, calibrator_id = result["obsid_list"]
    # The calibrator after them is observed by the whole array, and recorded too.
    assert observe_due(session_factory, settings, now=calibrator_id + 9, limit=5) == [
        obsid,
        calibrator_id,
    ]
    with session_factory() as session:
        calibrator = session.get(Observation, calibrator_id)
        assert calibrator is not None and calibrator.calibration
        assert calibrator.subarray_pointings is None and calibrator.files
        observation = session.get(Observation, obsid)
        assert observation is not None and observation.subarray_pointings
        scheduled = {p["subarray"]: p["delays"] for p in observation.subarray_pointings}
    layout_index = {t.tile_id: i for i, t in enumerate(instrument.tile_layout())}
    members = instrument.subarray_tiles()
    tiledata = fits.getdata(Path(settings.archive_dir) / str(obsid) / f"{obsid}.metafits", 1)
    seen = set()
    for tile_id, delays in zip(tiledata["Tile"], tiledata["Delays"], strict=True):
        (subarray,) = [n for n in scheduled if layout_index[int(tile_id)] in members[n]]
        assert list(delays) == scheduled[subarray]
        seen.add(subarray)
    assert seen == {"all_north", "all_south"} and scheduled["all_north"] != scheduled["all_south"]


def test_voltage_captures_are_recorded_within_the_size_limit(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        session.commit()
        small = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false", "nobs": 1,
            "exptime": 16, "freqspecs": "121,2"}, vcs=True, now=NOON)  # fmt: skip
        large = service.trigger_observations(session, settings, {
            "project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false", "nobs": 1,
            "exptime": 64, "freqspecs": "145,24"}, vcs=True, now=NOON + 100)  # fmt: skip
    assert small["success"] and large["success"], (small["errors"], large["errors"])
    # All-sky voltage capture: one dipole per tile, in the metafits as in the schedule.
    all_sky = ",".join(map(str, [0] + [32] * 15))
    (small_id,), (large_id,) = small["obsid_list"], large["obsid_list"]
    limited = settings.model_copy(update={"telescope_max_voltage_bytes": 200 * 2**20})
    assert observe_due(session_factory, limited, now=NOON + 1000, limit=5) == [small_id]
    with session_factory() as session:
        recorded = session.get(Observation, small_id)
        assert recorded is not None
        voltages = [f for f in recorded.files if f.kind == "voltage"]
        assert len(voltages) == 2 * 2  # 2 sub-files x 2 coarse channels
        assert recorded.mode == "MWAX_VCS" and recorded.n_tiles == 1
        metafits = Path(settings.archive_dir) / str(small_id) / f"{small_id}.metafits"
        assert fits.getheader(metafits)["DELAYS"] == all_sky  # was 0,0,...: the whole tile
        too_large = session.get(Observation, large_id)
        assert too_large is not None and not too_large.files  # 64 s x 24 channels: left alone
        # Both captures stay on the VCS disk at the full array's size, recorded or not (the
        # archive's sub-files hold one tile; vcsfree gave the space back once they ended).
        full_band_rate = 24 * settings.trigger_vcs_bytes_per_s_per_chan
        captured_bytes = (16 * 2 / 24 + 64) * full_band_rate
        expected = int((settings.trigger_vcs_capacity_bytes - captured_bytes) // full_band_rate)
        assert service.vcs_free_s(session, settings, now=NOON + 1000) == expected


def test_an_operator_schedules_observations_the_telescope_records_and_triggerbuffer_dumps(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Nothing could put an MWAX_BUFFER observation in the schedule: triggerbuffer could
    only ever answer "not buffering"."""
    start = NOON // 8 * 8 + 8
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        # The buffering's project (priority 0, as an unknown one had): with projects registered,
        # the schedule takes only theirs.
        create_project(session, "C001", priority=0)
        correlator = schedule_observation(
            session, start_gps=start, duration_s=8, mode="MWAX_CORRELATOR",
            coarse_chans=[121, 122], project_id="G0055", obsname="by hand", now_gps_s=NOON,
        )  # fmt: skip
        buffering = schedule_observation(
            session, start_gps=start + 8, duration_s=800, mode="MWAX_BUFFER",
            coarse_chans=[121, 122], project_id="C001", obsname="buffering", now_gps_s=NOON,
        )  # fmt: skip
        for bad, message in (
            ({"start_gps": start + 96}, "overlaps observation"),
            ({"start_gps": start - 16}, "in the past"),
            ({"start_gps": start + 1000, "duration_s": 10}, "multiples of 8"),
            ({"start_gps": start + 1000, "mode": "HW_LFILES"}, "is not one of"),
            ({"start_gps": start + 1000, "obsname": "café"}, "printable ASCII"),
            ({"start_gps": start + 1000, "obsname": "x" * 61}, "at most 60"),
            ({"start_gps": start + 1000, "obsname": ""}, "obsname is empty"),
        ):
            fields = {"start_gps": 0, "duration_s": 8, "mode": "MWAX_CORRELATOR",
                      "coarse_chans": [121], "project_id": "G0055", "obsname": "x", **bad}  # fmt: skip
            with pytest.raises(ValueError, match=message):
                schedule_observation(session, now_gps_s=NOON, **fields)
        session.commit()
        assert (correlator.created_by, buffering.mode) == ("schedule", "MWAX_BUFFER")
        dump = service.trigger_buffer(session, settings, {
            "project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false",
            "obstime": 16}, now=NOON + 40)  # fmt: skip
    assert dump["success"] is True, dump["errors"]
    settings = settings.model_copy(update={"telescope_tiles": 4})
    assert observe_due(session_factory, settings, now=start + 9, limit=10) == [start]
    # The dump saved the buffer from when buffering began (start + 8) to the trigger, and
    # goes on capturing for 16 s as an observation of its own: both reach the archive.
    # (Early in the buffering: every sub-file dumped is simulated, 41 MB each.)
    capture_obsid = dump["obsid_list"][-1]
    assert dump["obsid_list"] == [start + 8, capture_obsid]
    with session_factory() as session:
        capture = session.get(Observation, capture_obsid)
        assert capture is not None
        capture_end = capture.stoptime
    # Recorded once a dump that read the clock while it ran can no longer extend it.
    assert observe_due(session_factory, settings, now=capture_end + DUMP_SETTLE_S - 1,
                       limit=10) == []  # fmt: skip
    assert observe_due(session_factory, settings, now=capture_end + DUMP_SETTLE_S,
                       limit=10) == [capture_obsid]  # fmt: skip
    # The buffering observation once the buffer can reach it no more (later dumps could),
    # and a dump that read the clock just before then has been committed.
    reach_end = capture_obsid + settings.trigger_buffer_s + DUMP_SETTLE_S
    assert observe_due(session_factory, settings, now=reach_end - 1, limit=10) == []
    assert observe_due(session_factory, settings, now=reach_end, limit=10) == [start + 8]
    with session_factory() as session:
        buffered = session.get(Observation, start + 8)
        assert buffered is not None and buffered.stoptime == capture_obsid
        subfile_starts = sorted({int(f.name.split("_")[1]) for f in buffered.files
                                 if f.kind == FileKind.VOLTAGE})  # fmt: skip
        assert subfile_starts == list(range(start + 8, capture_obsid, 8))


def test_every_dump_of_buffering_observations_reaches_the_archive_and_vcsfree(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Two buffering observations back to back, three dumps: one reaching back into the
    first after it ended, two of the second while it runs. Each observation keeps the
    sub-files its dumps saved (not the gaps between them), vcsfree charges them from the
    dump on, and one never dumped stays empty. (A second dump was lost once the first was
    recorded; the first observation, ended undumped, was never looked at again.)

    The buffer holds 80 s here, not 240: every sub-file dumped is simulated (41 MB each).
    """
    settings = settings.model_copy(update={"trigger_buffer_s": 80})
    start = NOON // 8 * 8 + 8
    first, second, third = start, start + 800, start + 1600
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        # The buffering's project (priority 0, as an unknown one had): with projects registered,
        # the schedule takes only theirs.
        create_project(session, "C001", priority=0)
        for obsid, name in ((first, "first"), (second, "second"), (third + 3000, "never")):
            schedule_observation(
                session, start_gps=obsid, duration_s=800, mode="MWAX_BUFFER",
                coarse_chans=[121], project_id="C001", obsname=name, now_gps_s=NOON,
            )  # fmt: skip
        session.commit()
        free = service.vcs_free_s(session, settings, now=start + 849)
        key = {"project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false"}
        dumps = [
            service.trigger_buffer(session, settings, {**key, "end_time": start + 840},
                                   now=start + 850),
            service.trigger_buffer(session, settings, {**key, "start_time": start + 900,
                                   "end_time": start + 940}, now=start + 960),
            service.trigger_buffer(session, settings, {**key, "start_time": start + 1100,
                                   "end_time": start + 1110}, now=start + 1150),
        ]  # fmt: skip
        assert all(d["success"] for d in dumps), [d["errors"] for d in dumps]
        assert dumps[0]["obsid_list"] == [first, second]  # back to 770, where the buffer ends
        # The sub-files of 70 + 40 + 10 s of one channel (72 + 48 + 16 s) saved: charged at
        # once, before anything is recorded (vcsfree's whole seconds of the full band).
        charged = free - service.vcs_free_s(session, settings, now=start + 1201)
        assert charged == pytest.approx((72 + 48 + 16) / 24, abs=1)
    assert observe_due(session_factory, settings, now=start + 1201, limit=10) == [first]
    late = third + settings.trigger_buffer_s + DUMP_SETTLE_S
    assert observe_due(session_factory, settings, now=late, limit=10) == [second]
    assert observe_due(session_factory, settings, now=third + 3800 + 300, limit=10) == []
    with session_factory() as session:

        def subfiles(obsid: int) -> list[int]:
            observation = session.get(Observation, obsid)
            assert observation is not None
            return sorted({int(f.name.split("_")[1]) for f in observation.files
                           if f.kind == FileKind.VOLTAGE})  # fmt: skip

        assert subfiles(first) == list(range(start + 768, start + 800, 8))
        assert subfiles(second) == [
            *range(start + 800, start + 840, 8), *range(start + 896, start + 944, 8),
            *range(start + 1096, start + 1112, 8),
        ]  # fmt: skip
        assert subfiles(third + 3000) == []
        # Recorded at one tile, still charged at the full array's size.
        after = service.vcs_free_s(session, settings, now=third + 4100)
        assert free - after == pytest.approx(charged, abs=1)


def test_overlapping_dumps_are_charged_once(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """vcsfree charged each dump's span, twice where they overlap, until recorded."""
    start = NOON // 8 * 8 + 8
    with session_factory() as session:
        create_project(session, "G0055", priority=5, secure_key="runner-key-1")
        # The buffering's project (priority 0, as an unknown one had): with projects registered,
        # the schedule takes only theirs.
        create_project(session, "C001", priority=0)
        schedule_observation(
            session, start_gps=start, duration_s=800, mode="MWAX_BUFFER",
            coarse_chans=list(range(109, 133)), project_id="C001", obsname="b", now_gps_s=NOON,
        )  # fmt: skip
        session.commit()
        free = service.vcs_free_s(session, settings, now=start + 399)
        key = {"project_id": "G0055", "secure_key": "runner-key-1", "pretend": "false"}
        for now, first, last in ((start + 400, 300, 360), (start + 420, 330, 390)):
            dump = service.trigger_buffer(session, settings, {
                **key, "start_time": start + first, "end_time": start + last}, now=now)  # fmt: skip
            assert dump["success"] is True, dump["errors"]
        charged = free - service.vcs_free_s(session, settings, now=start + 421)
    assert charged == pytest.approx(90, abs=1)  # 300..390: 90 s of 24 channels


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("telescope_tiles", 200, r"TELESCOPE_TILES .* n_tiles 200 is out of range \(1\.\.128\)"),
        ("telescope_vcs_tiles", 129, r"VCS_TILES .* n_tiles 129 is out of range \(1\.\.128\)"),
        ("telescope_min_fine_chan_khz", 50, r"FINE_CHAN_KHZ .* 50000\.0 Hz is not valid"),
        ("telescope_min_int_time_s", 3, r"INT_TIME_S .* 3000\.0 ms is not valid"),
    ],
)
def test_a_server_whose_telescope_could_record_nothing_does_not_start(
    tmp_path: Path, setting: str, value: float, expected: str
) -> None:
    """``telescope_tiles = 200`` was taken (up to 256 were), the server started, and every
    observation then failed in the simulator, logged "not trying again"."""
    settings = Settings(data_dir=tmp_path, **{setting: value})
    with pytest.raises(ValueError, match=expected):
        create_app(settings, run_jobs=True)
    runner.check_telescope_settings(Settings(data_dir=tmp_path, telescope_runner=True))
    # The whole array, and the finest widths and shortest integrations MWAX has.
    runner.check_telescope_settings(
        Settings(
            data_dir=tmp_path,
            telescope_tiles=128,
            telescope_vcs_tiles=128,
            telescope_min_fine_chan_khz=0.2,
            telescope_min_int_time_s=0.25,
        )
    )
    create_app(
        Settings(data_dir=tmp_path, telescope_runner=False, **{setting: value}), run_jobs=True
    )
