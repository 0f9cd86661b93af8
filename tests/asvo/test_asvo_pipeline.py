"""ASVO jobs end to end on the in-process Dask cluster: submit, watch the websocket,
download the signed product (with ranges), cancel, expire."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends import sqlite_only
from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.archive.service import ingest_directory
from observatory.archive.simulated import simulate_and_register
from observatory.clients.csvjobs import parse_job_csv
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.gpstime import now_gps
from observatory.core.storage import Storage
from observatory.telescope.simulator import PointSource, _zenith_radec_deg, simulate_observation
from shared_data import MWA_DATA

API_KEY = "pipeline-test-key"
CORR_OBS = 1320409688  # real MWAX mini file
SIM_OBS = 1320412440  # simulated correlator observation (conversion)
VCS_OBS = 1320416040  # simulated voltage observation
STATE_ORDER = [
    "queued",
    "staging",
    "staged",
    "downloading",
    "preprocessing",
    "delivering",
    "completed",
]


def overhead(obsid: int) -> PointSource:
    """A 20 Jy source at the zenith in the middle of the observation."""
    ra_deg, dec_deg = _zenith_radec_deg(obsid + 8.0)
    return PointSource(ra_deg, dec_deg, 20.0)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def archive_settings(settings: Settings) -> Settings:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        ingest_directory(session, Storage(settings.archive_dir), MWA_DATA)
        simulate_and_register(
            session, settings, obsid=SIM_OBS, sources=[overhead(SIM_OBS)], n_tiles=4, n_timesteps=4
        )
        simulate_and_register(
            session, settings, obsid=VCS_OBS, sources=[overhead(VCS_OBS)], n_tiles=1, coarse_chans=(133,),
            n_timesteps=2, mode="MWAX_VCS",
        )  # fmt: skip
        create_user(session, "carol", API_KEY)
        session.commit()
    engine.dispose()
    return settings


@pytest.fixture
def client(archive_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(archive_settings, run_jobs=True)) as client:
        assert (
            client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY)).status_code
            == 200
        )
        yield client


def submit(client: TestClient, endpoint: str, **form: Any) -> int:
    reply = client.post(f"/api/{endpoint}", data={k: str(v) for k, v in form.items()})
    assert reply.status_code == 200, reply.text
    return int(reply.json()["job_id"])


def watch(client: TestClient, job_ids: set[int], timeout_s: float = 120) -> dict[int, list[str]]:
    """States each job passes through, from the websocket, until all are terminal."""
    seen: dict[int, list[str]] = {job_id: [] for job_id in job_ids}
    cookie = client.cookies["MWA_JOB_COOKIE"]
    deadline = time.monotonic() + timeout_s
    with client.websocket_connect(
        "/api/job_results", headers={"cookie": f"MWA_JOB_COOKIE={cookie}"}
    ) as socket:
        while any(not s or s[-1] not in ("completed", "error", "cancelled") for s in seen.values()):
            assert time.monotonic() < deadline, f"jobs did not finish: {seen}"
            frame = json.loads(socket.receive_text())
            row = frame["row"]
            if row["job_state"] == "completed":
                # mwa_client downloads from the frame itself: the signed URL must be in it.
                for file in row["product"]["files"]:
                    assert file["type"] != "acacia" or file["url"].startswith(
                        "http://testserver/api/download/"
                    )
            if row["id"] in seen and (
                not seen[row["id"]] or seen[row["id"]][-1] != row["job_state"]
            ):
                seen[row["id"]].append(row["job_state"])
    return seen


def rows_by_id(client: TestClient) -> dict[int, dict[str, Any]]:
    return {e["row"]["id"]: e["row"] for e in client.get("/api/get_jobs").json()}


def download(url: str, app_settings: Settings, headers: dict[str, str] | None = None) -> Any:
    # A fresh client: the signed URL must work without the login cookie.
    with TestClient(create_app(app_settings)) as anonymous:
        return anonymous.get(url, headers=headers or {})


def test_every_job_type_completes_with_a_checksummed_product(
    client: TestClient, archive_settings: Settings
) -> None:
    jobs = {
        "vis": submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis"),
        "vis_meta": submit(client, "download_vis_job", obs_id=1131733552, download_type="vis_meta"),
        "volt": submit(client, "voltage_job", obs_id=VCS_OBS, offset=8, duration=8),
        "conversion": submit(
            client, "conversion_job", obs_id=SIM_OBS, no_rfi="true", avg_time_res=4, output="uvfits"
        ),
    }
    seen = watch(client, set(jobs.values()))
    for kind, job_id in jobs.items():
        states = seen[job_id]
        assert states[-1] == "completed", (kind, states)
        assert states == sorted(states, key=STATE_ORDER.index), (kind, states)
    rows = rows_by_id(client)
    expected_members = {
        "vis": {"1320409688.metafits", "1320409688_20211108122750_mini_ch137_000.fits"},
        "vis_meta": {"1131733552.metafits", "1131733552_metafits_ppds.fits", "1131733552_mini_01.mwaf", "1131733552_mini_06.mwaf"},
        "volt": {f"{VCS_OBS}.metafits", f"{VCS_OBS}_{VCS_OBS + 8}_133.sub"},
        "conversion": {f"{SIM_OBS}.uvfits"},
    }  # fmt: skip
    (volt,) = rows[jobs.pop("volt")]["product"]["files"]  # voltages are left on scratch
    assert volt["type"] == "scratch" and rows_by_id(client)[int(Path(volt["path"]).name)]
    assert {p.name for p in Path(volt["path"]).iterdir()} == expected_members["volt"]
    for kind, job_id in jobs.items():
        (file,) = rows[job_id]["product"]["files"]
        assert file["type"] == "acacia"
        assert (
            file["url"]
            .split("?")[0]
            .endswith(f"/{rows[job_id]['job_params']['obs_id']}_{job_id}_{kind}.tar")
        )
        reply = download(file["url"], archive_settings)
        assert reply.status_code == 200
        body = reply.content
        assert len(body) == file["size"]
        assert hashlib.sha1(body).hexdigest() == file["sha1"]
        assert blake3.blake3(body).hexdigest() == file["blake3"]
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            assert set(tar.getnames()) == expected_members[kind]
    # The converted file is a uvfits of the averaged observation.
    conversion_url = rows[jobs["conversion"]]["product"]["files"][0]["url"]
    with tarfile.open(
        fileobj=io.BytesIO(download(conversion_url, archive_settings).content)
    ) as tar:
        member = tar.extractfile(f"{SIM_OBS}.uvfits")
        assert member is not None and member.read(6) == b"SIMPLE"


def _converted(client: TestClient, settings: Settings, job_id: int, tmp_path: Path) -> Any:
    """The output (uvfits or measurement set) of a completed conversion job, read by pyuvdata."""
    from pyuvdata import UVData

    (file,) = rows_by_id(client)[job_id]["product"]["files"]
    with tarfile.open(fileobj=io.BytesIO(download(file["url"], settings).content)) as tar:
        tar.extractall(tmp_path / str(job_id), filter="data")
    (output,) = (tmp_path / str(job_id)).glob(f"{SIM_OBS}.*")
    return UVData.from_file(str(output))


@sqlite_only
def test_csv_dc_flag_and_phase_centre_reach_the_converted_file(
    client: TestClient, archive_settings: Settings, tmp_path: Path
) -> None:
    # Cotter-era keys, as an old mwa_client CSV line has them (the stored params are what the
    # pipeline rebuilds the options from).
    (legacy,) = parse_job_csv(
        f"obs_id={SIM_OBS}, job_type=c, norfi=true, edgewidth=0, flagdcchannels=true, "
        "phasecentre=01h00m00s -27d30m00s\n"
    )
    flagged = submit(client, legacy.endpoint, **legacy.params)
    plain = submit(client, "conversion_job", obs_id=SIM_OBS, no_rfi="true", flag_edge_width=0)
    seen = watch(client, {flagged, plain})
    assert seen[flagged][-1] == seen[plain][-1] == "completed", seen
    chans_per_coarse = 32  # 40 kHz fine channels
    for job_id, dc_flagged in ((flagged, True), (plain, False)):
        uvd = _converted(client, archive_settings, job_id, tmp_path)
        assert uvd.Nfreqs == 2 * chans_per_coarse
        by_channel = uvd.flag_array.all(axis=(0, 2))
        dc = [chans_per_coarse // 2, chans_per_coarse + chans_per_coarse // 2]
        # MWAX data: the DC channel is flagged only when asked (Birli's default).
        assert list(by_channel[dc]) == [dc_flagged, dc_flagged], job_id
        others = np.delete(by_channel, dc)
        assert not others.any(), job_id
        centre = uvd.phase_center_catalog[uvd.phase_center_id_array[0]]
        if dc_flagged:
            assert np.degrees(centre["cat_lon"]) == pytest.approx(15.0)
            assert np.degrees(centre["cat_lat"]) == pytest.approx(-27.5)
        else:
            assert np.degrees(centre["cat_lat"]) != pytest.approx(-27.5)


def test_ranges_resume_to_identical_bytes(client: TestClient, archive_settings: Settings) -> None:
    job_id = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
    watch(client, {job_id})
    (file,) = rows_by_id(client)[job_id]["product"]["files"]
    whole = download(file["url"], archive_settings).content
    size = len(whole)
    normal = download(file["url"], archive_settings, {"Range": "bytes=1000-"})
    assert normal.status_code == 206
    assert normal.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
    assert whole[:1000] + normal.content == whole
    # giant-squid --keep-tar: the value repeats the header name and ends one past the last byte.
    quirky = download(file["url"], archive_settings, {"Range": f"Range: bytes=5000-{size}"})
    assert quirky.status_code == 206
    assert whole[:5000] + quirky.content == whole
    # A unit other than bytes is ignored (RFC 9110 section 14.2): the whole file.
    other_unit = download(file["url"], archive_settings, {"Range": "items=0-5"})
    assert other_unit.status_code == 200 and other_unit.content == whole
    for malformed in ("bytes=5-2", "bytes=abc"):  # a JSON error, as every other refusal
        refused = download(file["url"], archive_settings, {"Range": malformed})
        assert refused.status_code == 400
        assert refused.json()["error"].startswith("Range header")


def test_downloads_carry_size_date_and_etag(client: TestClient, archive_settings: Settings) -> None:
    job_id = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
    watch(client, {job_id})
    (file,) = rows_by_id(client)[job_id]["product"]["files"]
    with TestClient(create_app(archive_settings)) as anonymous:
        whole = anonymous.get(file["url"])
        head = anonymous.head(file["url"])
        part = anonymous.get(file["url"], headers={"Range": "bytes=100-"})
    size = file["size"]
    for reply in (whole, head):
        assert reply.status_code == 200
        assert reply.headers["content-length"] == str(size)
        assert "chunked" not in reply.headers.get("transfer-encoding", "")
        assert reply.headers["last-modified"] and reply.headers["etag"]
        assert reply.headers["accept-ranges"] == "bytes"
    assert head.content == b"" and len(whole.content) == size
    assert head.headers["etag"] == whole.headers["etag"]
    assert part.status_code == 206
    assert part.headers["content-length"] == str(size - 100)
    assert part.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    assert part.content == whole.content[100:]


def test_download_links_are_signed(client: TestClient, archive_settings: Settings) -> None:
    job_id = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
    watch(client, {job_id})
    (file,) = rows_by_id(client)[job_id]["product"]["files"]
    url = file["url"]
    assert download(url.replace("token=", "token=x"), archive_settings).status_code == 403
    assert download(url.split("?")[0], archive_settings).status_code == 403
    other = url.replace(f"/download/{job_id}/", f"/download/{job_id + 1}/")
    assert download(other, archive_settings).status_code == 403


BIG_OBS = 1320419640


def register_big_observation(settings: Settings) -> None:
    """An observation big enough that its conversion (with AOFlagger) takes a few seconds."""
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        simulate_and_register(
            session, settings, obsid=BIG_OBS, sources=[overhead(BIG_OBS)], n_tiles=48,
            coarse_chans=(133, 134, 135, 136), n_timesteps=16,
        )  # fmt: skip
        session.commit()
    engine.dispose()


def test_cancel_during_preprocessing_leaves_nothing(archive_settings: Settings) -> None:
    register_big_observation(archive_settings)
    with TestClient(create_app(archive_settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "conversion_job", obs_id=BIG_OBS)
        deadline = time.monotonic() + 60
        while rows_by_id(client)[job_id]["job_state"] != "preprocessing":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/api/cancel_job", params={"job_id": job_id}).status_code == 200
        # The task notices at its next chunk and cleans up.
        deadline = time.monotonic() + 60
        while (archive_settings.work_dir / str(job_id)).exists():
            assert time.monotonic() < deadline, "the cancelled job's work directory was not removed"
            time.sleep(0.1)
        row = rows_by_id(client)[job_id]
        assert row["job_state"] == "cancelled" and row["product"] is None
        assert not (archive_settings.products_dir / str(job_id)).exists()
        assert not _conversion_processes()  # stopped, not left running


def _conversion_processes() -> list[Any]:
    """This process's children running ``observatory preprocess`` (a job's conversion)."""
    import psutil

    return [
        child
        for child in psutil.Process().children(recursive=True)
        # The command, not a path: the test's directory is named after it, and the
        # archive's calibrator is fitted by ``calib-solve`` processes meanwhile.
        if "preprocess" in child.cmdline()
    ]


@sqlite_only
def test_a_conversion_that_crashes_fails_its_job_and_not_the_server(
    archive_settings: Settings,
) -> None:
    """A native abort (casacore's ``terminate``, a Rust panic) kills only the conversion."""
    import signal

    register_big_observation(archive_settings)
    with TestClient(create_app(archive_settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "conversion_job", obs_id=BIG_OBS, conversion="ms")
        deadline = time.monotonic() + 60
        while not (processes := _conversion_processes()):
            assert time.monotonic() < deadline, "no conversion process started"
            time.sleep(0.05)
        processes[0].send_signal(signal.SIGABRT)
        assert watch(client, {job_id})[job_id][-1] == "error"
        text = rows_by_id(client)[job_id]["error_text"]
        assert text.startswith("the conversion process died of SIGABRT"), text
        # The server and its workers carry on: the next conversion completes.
        second = submit(client, "conversion_job", obs_id=SIM_OBS, no_rfi="true")
        assert watch(client, {second})[second][-1] == "completed"
        assert not _conversion_processes()
        assert not (archive_settings.work_dir / str(job_id)).exists()


def test_products_expire(archive_settings: Settings) -> None:
    settings = archive_settings.model_copy(update={"asvo_product_ttl_days": 2 / 86_400})
    with TestClient(create_app(settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(
            client, "download_vis_job", obs_id=CORR_OBS, download_type="vis", delivery="acacia"
        )
        watch(client, {job_id})
        (file,) = rows_by_id(client)[job_id]["product"]["files"]
        deadline = time.monotonic() + 30
        while rows_by_id(client)[job_id]["job_state"] != "expired":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert not (settings.products_dir / str(job_id)).exists()
        reply = download(file["url"], settings)
        assert reply.status_code == 404  # gone with its product (giant-squid: "expired")
        assert "expired" in reply.json()["error"]


def test_scratch_delivery_is_a_directory(client: TestClient, archive_settings: Settings) -> None:
    job_id = submit(
        client, "download_vis_job", obs_id=CORR_OBS, download_type="vis", delivery="scratch"
    )
    watch(client, {job_id})
    (file,) = rows_by_id(client)[job_id]["product"]["files"]
    assert file["type"] == "scratch" and file.get("url") is None
    path = Path(file["path"])
    assert path.is_dir() and path.name == str(job_id)
    assert {p.name for p in path.iterdir()} == {
        "1320409688.metafits",
        "1320409688_20211108122750_mini_ch137_000.fits",
    }
    assert file["size"] == sum(p.stat().st_size for p in path.iterdir())


def test_delivery_format_tar_puts_one_tar_in_the_directory(
    client: TestClient, archive_settings: Settings
) -> None:
    """giant-squid's ``delivery_format=tar`` ("deliver a tar of the files, rather than all of
    the individual files"): it was accepted and ignored, and made a duplicate of the plain job."""
    plain = submit(
        client, "download_vis_job", obs_id=CORR_OBS, download_type="vis", delivery="scratch"
    )
    tarred = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis",
                    delivery="scratch", delivery_format="tar")  # fmt: skip
    assert tarred != plain
    watch(client, {plain, tarred})
    rows = rows_by_id(client)
    assert rows[tarred]["job_params"]["delivery_format"] == "tar"
    (file,) = rows[tarred]["product"]["files"]
    path = Path(file["path"])
    (tar_path,) = path.iterdir()
    assert (
        tar_path.name == f"{CORR_OBS}_{tarred}_vis.tar" and file["size"] == tar_path.stat().st_size
    )
    with tarfile.open(tar_path) as tar:
        assert set(tar.getnames()) == {
            p.name for p in Path(rows[plain]["product"]["files"][0]["path"]).iterdir()
        }
    # acacia is a tar whatever is asked: the same job
    acacia = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
    again = client.post("/api/download_vis_job", data={"obs_id": CORR_OBS, "download_type": "vis",
                                                       "delivery_format": "tar"})  # fmt: skip
    assert again.status_code == 400 and again.json()["job_id"] == acacia


def test_voltage_jobs_are_left_on_scratch_only(client: TestClient) -> None:
    """As the MWA ASVO's clients say: a voltage job without a delivery goes to scratch, and
    acacia or dug are refused (error_code 0, which mwa_client reports and skips)."""
    for delivery in ("acacia", "dug"):
        refused = client.post("/api/voltage_job", data={"obs_id": VCS_OBS, "offset": 8,
                                                        "duration": 8, "delivery": delivery})  # fmt: skip
        assert refused.status_code == 400
        assert refused.json() == {
            "error": f"Delivery: voltage jobs are delivered to scratch only, not {delivery!r}",
            "error_code": 0,
        }
    job_id = submit(client, "voltage_job", obs_id=VCS_OBS, offset=8, duration=8)
    assert rows_by_id(client)[job_id]["job_params"]["delivery"] == "scratch"


def test_scratch_paths_are_absolute_when_the_data_dir_is_relative(
    archive_settings: Settings, tmp_path: Path
) -> None:
    # The default data dir is ./observatory-data: relative to the server's directory, which
    # means nothing to a client elsewhere. (The tests run in tmp_path.)
    settings = archive_settings.model_copy(update={"asvo_dug_root": Path("relative-dug")})
    assert Settings(data_dir=Path("observatory-data")).delivery_root("scratch") == (
        tmp_path / "observatory-data" / "scratch"
    )
    with TestClient(create_app(settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(
            client, "download_vis_job", obs_id=CORR_OBS, download_type="vis", delivery="dug"
        )
        assert watch(client, {job_id})[job_id][-1] == "completed"
        (file,) = rows_by_id(client)[job_id]["product"]["files"]
    assert file["path"] == str(tmp_path / "relative-dug" / "user1" / "asvo" / str(job_id))
    assert Path(file["path"]).is_dir()


@sqlite_only
def test_a_metafits_archived_as_obsid_metafits_fits_is_converted(
    settings: Settings, tmp_path: Path
) -> None:
    """The archive takes ``<obsid>_metafits.fits`` as the metafits (and serves it by that
    name); the conversion looked for ``.metafits`` only and failed the job."""
    incoming = tmp_path / "incoming"
    simulate_observation(incoming, SIM_OBS, n_tiles=4, coarse_chans=(133,), n_timesteps=2,
                         sources=[overhead(SIM_OBS)])  # fmt: skip
    (incoming / f"{SIM_OBS}.metafits").rename(incoming / f"{SIM_OBS}_metafits.fits")
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        ingest_directory(session, Storage(settings.archive_dir), incoming)
        create_user(session, "carol", API_KEY)
        session.commit()
    engine.dispose()
    with TestClient(create_app(settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "conversion_job", obs_id=SIM_OBS, no_rfi="true")
        states = watch(client, {job_id})[job_id]
        assert states[-1] == "completed", rows_by_id(client)[job_id]["error_text"]


@sqlite_only
def test_a_conversion_completes_when_the_data_dir_is_relative(
    archive_settings: Settings, tmp_path: Path
) -> None:
    """As the demo's ./observatory-data: the conversion process runs in its work directory."""
    assert Path.cwd() == tmp_path and archive_settings.data_dir.is_relative_to(tmp_path)
    relative = archive_settings.model_copy(
        update={"data_dir": archive_settings.data_dir.relative_to(tmp_path)}
    )
    with TestClient(create_app(relative, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "conversion_job", obs_id=SIM_OBS, no_rfi="true")
        states = watch(client, {job_id})[job_id]
        assert states[-1] == "completed", rows_by_id(client)[job_id]["error_text"]


def test_a_task_that_keeps_breaking_ends_the_job_in_error(
    archive_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import observatory.asvo.dispatcher as dispatcher_module

    def broken(_settings: dict[str, Any], job_id: int) -> str:
        # As a run killed mid-conversion leaves its attempt directory behind.
        leftover = archive_settings.work_dir / str(job_id) / "attempt-dead" / ".o.uvfits.scratch"
        leftover.mkdir(parents=True, exist_ok=True)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dispatcher_module, "run_job", broken)
    with TestClient(create_app(archive_settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
        states = watch(client, {job_id}, timeout_s=60)[job_id]
        assert states[-1] == "error"
        row = rows_by_id(client)[job_id]
        assert row["error_text"] == "internal error: disk on fire"
    assert not (archive_settings.work_dir / str(job_id)).exists()  # given up: nothing left


def test_a_calibration_request_whose_task_keeps_breaking_fails_with_the_reason(
    archive_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was submitted again for ever (71 times in 15 s), and the ASVO jobs waiting for it
    stayed in waitcal for good."""
    import observatory.asvo.dispatcher as dispatcher_module
    from observatory.calib.models import CalibrationRequest

    def broken(_settings: dict[str, Any], _request_id: int) -> str:
        raise RuntimeError("worker lost")

    monkeypatch.setattr(dispatcher_module, "run_request", broken)
    engine = make_engine(archive_settings.resolved_database_url)
    factory = make_session_factory(engine)
    with factory() as session:
        added = CalibrationRequest(cal_id=SIM_OBS, target_obs_id=SIM_OBS)
        session.add(added)
        session.commit()
        request_id = added.id
    try:
        with TestClient(create_app(archive_settings, run_jobs=True)):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with factory() as session:
                    request = session.get(CalibrationRequest, request_id)
                    assert request is not None
                    if request.calibration_error_datetime is not None:
                        break
                time.sleep(0.2)
        assert request.calibration_error_datetime is not None, "never given up"
        assert request.calibration_error_message == "internal error: worker lost"
    finally:
        engine.dispose()


def test_apply_di_cal_fails_clearly_without_a_calibrator_in_range(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="observatory.asvo.pipeline")
    job_id = submit(client, "conversion_job", obs_id=SIM_OBS, apply_di_cal="true", no_rfi="true")
    assert watch(client, {job_id})[job_id][-1] == "error"
    text = rows_by_id(client)[job_id]["error_text"]
    assert text.startswith("apply_di_cal: no calibration solution is available")
    assert "no calibrator observation within 86400 s" in text
    # A request that cannot be met is the user's, not the server's: one line, no traceback.
    [record] = [r for r in caplog.records if f"ASVO job {job_id} failed" in r.getMessage()]
    assert (record.levelno, record.exc_info) == (logging.INFO, None)
    assert "no calibration solution is available" in record.getMessage()


@sqlite_only
def test_a_job_waits_for_calibration_before_anything_is_staged(
    archive_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ASVO's order is queued -> (waitcal) -> staging: the job went staging, staged,
    downloading, preprocessing, then waitcal (and staged its files again after)."""
    from observatory.asvo import pipeline
    from observatory.asvo.models import JobState, JobType
    from observatory.asvo.service import submit_job

    target = (now_gps() - 1200) // 8 * 8
    engine = make_engine(archive_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        simulate_and_register(session, archive_settings, obsid=target, sources=[overhead(target)],
                              n_tiles=4, n_timesteps=2)  # fmt: skip
        recorded = session.get(Observation, target)
        assert recorded is not None
        session.add(Observation(  # its calibrator, scheduled and not recorded yet
            obsid=target + 600, stoptime=target + 720, obsname="cal", creator="test",
            project_id=recorded.project_id, mode="MWAX_CORRELATOR", calibration=True,
            calibrator_source="3C444", delays=[0] * 16, coarse_chans=recorded.coarse_chans,
        ))  # fmt: skip
        job = submit_job(session, archive_settings, 1, JobType.CONVERSION,
                         {"obs_id": str(target), "apply_di_cal": "true", "no_rfi": "true"})  # fmt: skip
        session.commit()
        job_id = job.id
    engine.dispose()
    moves: list[str] = []
    move = pipeline._Tracker.move

    def recorded_move(self: Any, state: JobState, **fields: Any) -> None:
        moves.append(state.value)
        move(self, state, **fields)

    monkeypatch.setattr(pipeline._Tracker, "move", recorded_move)
    assert pipeline.run_job(archive_settings.model_dump(), job_id) == "waitcal"
    assert moves == ["waitcal"]


def test_apply_di_cal_waits_for_a_calibrator_still_to_be_recorded(
    archive_settings: Settings,
) -> None:
    """A trigger schedules its calibrator after the target: a job for the target waits for
    it (it failed at once), and fails once it can no longer come."""
    target = (now_gps() - 1200) // 8 * 8
    engine = make_engine(archive_settings.resolved_database_url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        simulate_and_register(session, archive_settings, obsid=target, sources=[overhead(target)],
                              n_tiles=4, n_timesteps=2)  # fmt: skip
        recorded = session.get(Observation, target)
        assert recorded is not None
        session.add(Observation(
            obsid=target + 600, stoptime=target + 720, obsname="cal", creator="test",
            project_id=recorded.project_id, mode="MWAX_CORRELATOR", calibration=True,
            calibrator_source="3C444", delays=[0] * 16, coarse_chans=recorded.coarse_chans,
        ))  # fmt: skip
        session.commit()
    with TestClient(create_app(archive_settings, run_jobs=True)) as client:
        client.post("/api/api_login", headers=basic("giant-squidv2.5.1", API_KEY))
        job_id = submit(client, "conversion_job", obs_id=target, apply_di_cal="true", no_rfi="true")
        deadline = time.monotonic() + 60
        while rows_by_id(client)[job_id]["job_state"] != "waitcal":
            assert (
                time.monotonic() < deadline and rows_by_id(client)[job_id]["job_state"] != "error"
            )
            time.sleep(0.1)
        time.sleep(3)  # several dispatcher passes: it keeps waiting
        assert rows_by_id(client)[job_id]["job_state"] == "waitcal"
        with sessions() as session:  # the calibrator is taken off the schedule
            calibrator = session.get(Observation, target + 600)
            assert calibrator is not None
            calibrator.deleted = True
            session.commit()
        assert watch(client, {job_id})[job_id][-1] == "error"
        text = rows_by_id(client)[job_id]["error_text"]
        assert text.startswith("apply_di_cal: no calibration solution is available")
    engine.dispose()


def test_dispatch_follows_priority_then_age(archive_settings: Settings) -> None:
    from observatory.asvo.dispatcher import Dispatcher
    from observatory.asvo.models import Job

    engine = make_engine(archive_settings.resolved_database_url)
    session_factory = make_session_factory(engine)
    with session_factory() as session:
        for priority in (1, 5, 3, 5):
            session.add(Job(user_id=1, job_type=1, obs_id=CORR_OBS, state="queued", priority=priority,
                            params={"delivery": "acacia", "job_type": "download", "priority": priority,
                                    "download_type": "vis", "obs_id": str(CORR_OBS)},
                            request_key=f"p{priority}-{len(session.new)}", delivery="acacia",
                            cancel_requested=False, deleted=False))  # fmt: skip
        session.commit()

    class RecordingClient:
        """Stands in for the Dask client: records what is submitted, in order."""

        def __init__(self) -> None:
            self.order: list[tuple[int, int]] = []

        def submit(self, _function: Any, _settings: Any, job_id: int, **options: Any) -> Any:
            self.order.append((job_id, options["priority"]))
            return _Pending()

    class _Pending:
        def done(self) -> bool:
            return False

    dispatcher = Dispatcher(archive_settings, session_factory)
    recorder = RecordingClient()
    dispatcher._client = recorder
    dispatcher.step()
    assert recorder.order == [(2, 5), (4, 5), (3, 3), (1, 1)]
    dispatcher.step()  # running jobs are not submitted twice
    assert len(recorder.order) == 4
    engine.dispose()


def test_a_metadata_download_of_an_observation_not_recorded_fails_saying_so(
    client: TestClient, archive_settings: Settings
) -> None:
    """It completed, with an empty tar (an ended observation whose files have not reached
    the archive: the recording's lag, a buffer never dumped)."""
    from observatory.archive.service import schedule_observation

    ended = now_gps() // 8 * 8 - 800
    engine = make_engine(archive_settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        schedule_observation(session, start_gps=ended, duration_s=8, mode="MWAX_CORRELATOR",
                             coarse_chans=[121], project_id="C001", obsname="not recorded",
                             now_gps_s=ended - 100)  # fmt: skip
        session.commit()
    engine.dispose()
    job_id = submit(client, "download_vis_job", obs_id=ended, download_type="vis_meta")
    assert watch(client, {job_id})[job_id][-1] == "error"
    assert (
        f"Observation {ended} has no metafits in the archive"
        in rows_by_id(client)[job_id]["error_text"]
    )


@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_a_damaged_archive_file_fails_the_job_naming_it(
    client: TestClient, archive_settings: Settings, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated raw file was delivered in a completed job, its product's checksums
    computed over the damaged bytes (so every client reported it verified)."""
    name = "1320409688_20211108122750_mini_ch137_000.fits"
    (stored,) = archive_settings.archive_dir.rglob(name)
    stored.chmod(0o644)
    content = bytearray(stored.read_bytes())
    if damage == "truncated":
        del content[100_000:]
    else:
        content[-1] ^= 0xFF
    stored.write_bytes(bytes(content))
    job_id = submit(client, "download_vis_job", obs_id=CORR_OBS, download_type="vis")
    with caplog.at_level(logging.ERROR):
        assert watch(client, {job_id})[job_id][-1] == "error"
    row = rows_by_id(client)[job_id]
    assert f"{name} of observation {CORR_OBS} is damaged in the archive" in row["error_text"]
    assert ("bytes where the catalogue records" in row["error_text"]) == (damage == "truncated")
    assert any(name in record.getMessage() for record in caplog.records)  # for the operators
