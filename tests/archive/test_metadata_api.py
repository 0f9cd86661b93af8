import pytest
from fastapi.testclient import TestClient

from observatory.app import create_app
from observatory.archive.service import ingest_directory, schedule_observation
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.storage import Storage
from observatory.trigger.service import vcs_free_s
from shared_data import MWA_DATA


@pytest.fixture
def client(settings: Settings) -> TestClient:
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        ingest_directory(session, Storage(settings.archive_dir), MWA_DATA)
        session.commit()
    engine.dispose()
    with TestClient(create_app(settings)) as client:
        yield client


def test_healthz_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert "/metadata/obs" in spec["paths"]


def test_obs_json(client: TestClient) -> None:
    reply = client.get("/metadata/obs", params={"obs_id": "1320409688"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["obsid"] == 1320409688
    assert body["exposure_s"] == 120
    assert body["project_id"] == "G0009"
    assert {f["name"] for f in body["files"]} == {
        "1320409688.metafits",
        "1320409688_20211108122750_mini_ch137_000.fits",
    }
    assert body["total_size_bytes"] == 74880 + 406080


@pytest.mark.parametrize("path", ["/metadata/obs", "/metadata/fits", "/metadata/obs_page"])
@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "123456789012"])
def test_malformed_obsid_is_400(client: TestClient, path: str, bad: str) -> None:
    reply = client.get(path, params={"obs_id": bad})
    assert reply.status_code == 400
    assert "obsid" in reply.json()["error"]


@pytest.mark.parametrize("path", ["/metadata/obs", "/metadata/fits", "/metadata/obs_page"])
def test_unknown_obsid_is_404(client: TestClient, path: str) -> None:
    reply = client.get(path, params={"obs_id": "1000000000"})
    assert reply.status_code == 404
    assert reply.json() == {"error": "Observation 1000000000 does not exist", "error_code": 1}


def test_missing_obsid_is_400(client: TestClient) -> None:
    reply = client.get("/metadata/obs")
    assert reply.status_code == 400
    assert "obs_id" in reply.json()["error"]


def test_metafits_download(client: TestClient) -> None:
    reply = client.get("/metadata/fits", params={"obs_id": 1131733552})
    assert reply.status_code == 200
    assert reply.content == (MWA_DATA / "1131733552.metafits").read_bytes()
    assert "1131733552_metafits.fits" in reply.headers["content-disposition"]


def test_obs_page(client: TestClient) -> None:
    reply = client.get("/metadata/obs_page", params={"obs_id": 1131733552})
    assert reply.status_code == 200
    assert "text/html" in reply.headers["content-type"]
    assert "high_EoRSLS_2457342" in reply.text
    assert "2015-11-16 18:25:35" in reply.text
    assert "1131733552_mini_01.mwaf" in reply.text
    assert "<td>40 kHz, 0.5 s</td>" in reply.text
    assert 'href="fits?obs_id=1131733552">Download metafits</a>' in reply.text


def test_the_page_of_an_observation_not_yet_recorded(
    client: TestClient, settings: Settings
) -> None:
    """It showed "None kHz, None s": the schedule knows no resolution until it is recorded."""
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        schedule_observation(session, start_gps=2000000000, duration_s=120, mode="MWAX_VCS",
                             coarse_chans=[121], project_id="C001", obsname="later",
                             now_gps_s=1999999000,
                             vcs_free_s=lambda s, now: vcs_free_s(s, settings, now))  # fmt: skip
        session.commit()
    engine.dispose()
    page = client.get("/metadata/obs_page", params={"obs_id": 2000000000}).text
    assert "<td>-, -</td>" in page and "None" not in page
    # No link to a metafits the archive does not have (it was a 404).
    assert "Download metafits" not in page and "No metafits in the archive yet" in page


def test_find(client: TestClient) -> None:
    reply = client.get("/metadata/find")
    assert reply.status_code == 200
    assert [o["obsid"] for o in reply.json()] == [1320409688, 1131733552, 1061315448]
    assert "x-total-count" not in reply.headers
    assert reply.headers["x-has-more"] == "false"
    assert client.get("/metadata/find", params={"count": True}).headers["x-total-count"] == "3"
    # Overlap semantics: an observation running through mintime counts.
    in_range = client.get(
        "/metadata/find", params={"mintime": 1131733552 + 100, "maxtime": 1320409688}
    )
    assert [o["obsid"] for o in in_range.json()] == [1320409688, 1131733552]
    by_mode = client.get("/metadata/find", params={"mode": "MWAX_CORRELATOR"})
    assert [o["obsid"] for o in by_mode.json()] == [1320409688]
    paged = client.get("/metadata/find", params={"pagesize": 1, "page": 2, "count": True})
    assert [o["obsid"] for o in paged.json()] == [1131733552]
    assert paged.headers["x-total-count"] == "3"
    assert paged.headers["x-has-more"] == "true"
    keyset = client.get("/metadata/find", params={"pagesize": 1, "before": 1320409688})
    assert [o["obsid"] for o in keyset.json()] == [1131733552]
    last = client.get("/metadata/find", params={"pagesize": 1, "page": 3})
    assert last.headers["x-has-more"] == "false"
    assert client.get("/metadata/find", params={"projectid": "X"}).json() == []
    assert (
        client.get("/metadata/find", params={"calibration": True}).json()[0]["obsid"] == 1320409688
    )


def test_find_text_filters_ignore_case(client: TestClient) -> None:
    """Astronomers type "g0009" for G0009, "djacobs" for DJacobs, "eorsls" for EoRSLS."""

    def obsids(**params: object) -> list[int]:
        reply = client.get("/metadata/find", params=params)
        assert reply.status_code == 200, reply.text
        return [o["obsid"] for o in reply.json()]

    everything = [1320409688, 1131733552, 1061315448]
    assert obsids(projectid="g0009") == obsids(projectid="G0009") == everything
    counted = client.get("/metadata/find", params={"projectid": "g0009", "count": True})
    assert counted.headers["x-total-count"] == "3"
    assert obsids(creator="djacobs") == obsids(creator="DJACOBS") == [1061315448]
    assert obsids(creator="djacob") == []  # a whole value, not a substring
    assert obsids(obsname="EORSLS") == [1131733552]
    assert obsids(obsname="3c444") == [1320409688]
    assert obsids(mode="mwax_correlator") == [1320409688]
    assert obsids(projectid="g0009", mode="hw_lfiles", creator="jline") == [1131733552]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mintime": "abc"}, "mintime"),
        ({"mintime": 20, "maxtime": 10}, "before mintime"),
        ({"pagesize": 0}, "pagesize"),
        ({"page": 0}, "page"),
        ({"mode": "BOGUS"}, "mode"),
        ({"mode": "bogus"}, "'bogus'"),
    ],
)
def test_find_bad_input(client: TestClient, params: dict[str, object], message: str) -> None:
    reply = client.get("/metadata/find", params=params)
    assert reply.status_code == 400
    assert message in reply.json()["error"]
