"""The Grafana JSON datasource endpoints, checked against the protocol (specs/calib.md section 6)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from observatory.app import create_app
from observatory.archive.models import Observation
from observatory.calib import grafana, service
from observatory.calib.formats import CalSolutions
from observatory.core.config import Settings
from observatory.core.gpstime import gps_to_unix, gps_to_utc_iso
from observatory.telescope.instrument import tile_layout
from shared_data import CALIB_DATA

RX = 1
TILES = [t for t in tile_layout() if t.rx == RX][:3]
FIT_TIMES = [1_400_000_000, 1_400_003_600]


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with session_factory() as session:
        for number, obsid in enumerate(FIT_TIMES):
            session.add(Observation(obsid=obsid, stoptime=obsid + 120, mode="MWAX_CORRELATOR", calibration=True,
                                    calibrator_source=("HydA", "PicA")[number], coarse_chans=list(range(109, 133))))  # fmt: skip
            session.flush()
            rows = [{"tileid": t.tile_id, "antenna": i, "x_delay_m": 0.1 * (i + 1) + number,
                     "y_delay_m": -0.2 * (i + 1) + number, "x_phase_fit_quality": 0.8, "y_phase_fit_quality": 0.6}
                    for i, t in enumerate(TILES)]  # fmt: skip
            service.store_fit(
                session, settings, obsid, CalSolutions(jones=np.ones((1, 3, 4, 4), complex)), rows
            )
        session.commit()
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def query(client: TestClient, target: str, **payload: Any) -> list[dict[str, Any]]:
    body = {"range": {"from": gps_to_utc_iso(FIT_TIMES[0] - 10) + "Z", "to": gps_to_utc_iso(FIT_TIMES[1] + 10) + "Z"},
            "targets": [{"target": target, "refId": "A", "payload": payload}], "intervalMs": 30000}  # fmt: skip
    reply = client.post("/calib/grafana/query", json=body)
    assert reply.status_code == 200, reply.text
    frames = reply.json()
    for frame in frames:  # Grafana's DataFrameJSON: a time field, then values of the same length
        fields = frame["schema"]["fields"]
        assert fields[0]["type"] == "time" and len(fields) == 2
        assert len(frame["data"]["values"]) == 2 and len(frame["data"]["values"][0]) == len(
            frame["data"]["values"][1]
        )
    return frames


def test_test_connection_metrics_and_payload_options(client: TestClient) -> None:
    assert client.get("/calib/grafana/").status_code == 200
    assert client.get("/calib/grafana").status_code == 200
    metrics = client.post("/calib/grafana/metrics", json={}).json()
    values = [m["value"] for m in metrics]
    assert values[0] == "rec01" and values[-1] == "sources" and len(values) == 17
    # The documentation's plain URL (a browser, curl) lists the same targets.
    assert client.get("/calib/grafana/metrics").json() == metrics
    assert client.get("/calib/grafana/query").status_code == 405  # needs Grafana's body
    assert [p["name"] for p in metrics[0]["payloads"]] == ["channel", "source", "style", "clip"]
    assert all(set(p) >= {"name", "type"} for p in metrics[0]["payloads"])
    style = client.post("/calib/grafana/metric-payload-options", json={
        "metric": "rec01", "payload": {"channel": "ANY", "source": "ANY", "style": "tilemean", "clip": "None"},
        "name": "style"}).json()  # fmt: skip
    assert style == [{"label": "Full", "value": "full"}, {"label": "Y-X", "value": "Y-X"},
                     {"label": "Receiver Mean", "value": "recmean"}, {"label": "Tile Mean", "value": "tilemean"},
                     {"label": "Phase Fit Quality", "value": "quality"}]  # fmt: skip
    sources = client.post(
        "/calib/grafana/metric-payload-options", json={"metric": "rec01", "name": "source"}
    ).json()
    assert sources == [{"label": "Any", "value": "ANY"}, {"label": "HydA", "value": "HydA"},
                       {"label": "PicA", "value": "PicA"}]  # fmt: skip
    channels = client.post("/calib/grafana/metric-payload-options", json={"name": "channel"}).json()
    assert channels[0]["value"] == "ANY" and len(channels) == 25
    assert (
        client.post("/calib/grafana/metric-payload-options", json={"name": "colour"}).status_code
        == 400
    )
    assert client.post("/calib/grafana/metric-payload-options", json={}).status_code == 400
    assert client.post("/calib/grafana/metrics", content=b"not json").status_code == 400
    # A zone that moves a time past year 9999: 400 naming the range (it was a 500).
    beyond = client.post("/calib/grafana/query", json={
        "range": {"from": "2024-01-01T00:00:00Z", "to": "9999-12-31T23:59:59-12:00"},
        "targets": [{"target": "rec01", "refId": "A"}]})  # fmt: skip
    assert beyond.status_code == 400 and "range.from and range.to" in beyond.json()["error"]


def test_a_refit_is_one_point_of_its_observation(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Grafana gets one point per observation, from its newest fit."""
    with session_factory() as session:
        rows = [{"tileid": t.tile_id, "antenna": i, "x_delay_m": 5.0, "y_delay_m": 5.0}
                for i, t in enumerate(TILES)]  # fmt: skip
        service.store_fit(
            session,
            settings,
            FIT_TIMES[0],
            CalSolutions(jones=np.ones((1, 3, 4, 4), complex)),
            rows,
        )
        session.commit()
    times = [gps_to_unix(t) * 1000 for t in FIT_TIMES]
    (sources,) = query(client, "sources")
    assert sources["data"]["values"] == [times, ["HydA", "PicA"]]
    full = {f["schema"]["name"]: f["data"]["values"] for f in query(client, "rec01", style="full")}
    assert full[f"{TILES[0].tile_name} X"] == [times, [pytest.approx(5.0), pytest.approx(1.1)]]


def test_query_styles_and_filters(client: TestClient) -> None:
    times = [gps_to_unix(t) * 1000 for t in FIT_TIMES]
    full = {
        f["schema"]["name"]: f["data"]["values"]
        for f in query(client, f"rec{RX:02d}", style="full")
    }
    first = TILES[0].tile_name
    assert full[f"{first} X"] == [times, [pytest.approx(0.1), pytest.approx(1.1)]]
    assert full[f"{first} Y"] == [times, [pytest.approx(-0.2), pytest.approx(0.8)]]
    assert len(full) == 2 * len(TILES)
    y_minus_x = {
        f["schema"]["name"]: f["data"]["values"][1]
        for f in query(client, f"rec{RX:02d}", style="Y-X")
    }
    assert y_minus_x[f"{first} Y-X"] == [pytest.approx(-0.3), pytest.approx(-0.3)]
    (mean,) = query(client, f"rec{RX:02d}", style="recmean")
    assert mean["data"]["values"][1][0] == pytest.approx(np.mean([0.1, 0.2, 0.3, -0.2, -0.4, -0.6]))
    tilemean = {
        f["schema"]["name"]: f["data"]["values"][1]
        for f in query(client, f"rec{RX:02d}", style="tilemean")
    }
    assert tilemean[first] == [pytest.approx(-0.05), pytest.approx(0.95)]
    quality = query(client, f"rec{RX:02d}", style="quality")
    assert quality[0]["data"]["values"][1] == [pytest.approx(0.7), pytest.approx(0.7)]
    clipped = {
        f["schema"]["name"]: f["data"]["values"][1]
        for f in query(client, f"rec{RX:02d}", style="full", clip="0.5")
    }
    assert clipped[f"{first} X"] == [pytest.approx(0.1)]  # 1.1 m is beyond the clip
    only_pica = query(client, f"rec{RX:02d}", style="full", source="PicA")
    assert all(f["data"]["values"][0] == times[1:] for f in only_pica)
    assert query(client, f"rec{RX:02d}", style="full", channel="60") == []
    (sources,) = query(client, "sources")
    assert sources["data"]["values"] == [times, ["HydA", "PicA"]]
    hidden = client.post("/calib/grafana/query", json={"range": {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
                                                      "targets": [{"target": "rec01", "hide": True}]})  # fmt: skip
    assert hidden.json() == []
    assert (
        client.post("/calib/grafana/query", json={"targets": [{"target": "rec01"}]}).status_code
        == 400
    )
    unknown = client.post("/calib/grafana/query", json={"range": {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
                                                       "targets": [{"target": "tile7"}]})  # fmt: skip
    assert unknown.status_code == 400
    bad_style = client.post("/calib/grafana/query", json={"range": {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
                                                         "targets": [{"target": "rec01", "payload": {"style": "fancy"}}]})  # fmt: skip
    assert bad_style.status_code == 400
    # Hand-written queries: a payload as JSON text is read; other shapes are 400, not 500.
    span = {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"}
    as_text = client.post("/calib/grafana/query", json={"range": span, "targets": [
        {"target": f"rec{RX:02d}", "payload": '{"style": "recmean"}'}]})  # fmt: skip
    assert as_text.status_code == 200
    assert [f["schema"]["name"] for f in as_text.json()] == [f"rec{RX:02d} mean"]
    for targets, named in (
        ([{"target": "rec01", "payload": [1]}], "payload"),
        ([{"target": "rec01", "payload": "{not json"}], "payload"),
        ("rec01", "targets"),
        (["rec01"], "targets"),
        ([{"target": "rec01", "payload": {"clip": "-1"}}], "clip"),
        ([{"target": "rec01", "payload": {"channel": "abc"}}], "channel"),
    ):
        reply = client.post("/calib/grafana/query", json={"range": span, "targets": targets})
        assert reply.status_code == 400 and named in reply.json()["error"], (targets, reply.text)


def test_every_receiver_metrics_offers_is_answered(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The newest fit's array (a real 144-tile metafits) has receivers 17 and 18: /metrics
    offers them, and a query over a range without that fit was 400 'not in the array',
    failing the whole panel."""
    from observatory.archive.service import ingest_directory
    from observatory.core.storage import Storage

    obsid = 1_369_821_496
    (tmp_path / "in").mkdir()
    shutil.copy(CALIB_DATA / f"{obsid}_metafits.fits", tmp_path / "in" / f"{obsid}.metafits")
    with session_factory() as session:
        ingest_directory(session, Storage(settings.archive_dir), tmp_path / "in")
        session.flush()
        service.store_fit(
            session, settings, obsid, CalSolutions(jones=np.ones((1, 3, 4, 4), complex)), []
        )
        session.commit()
    with TestClient(create_app(settings)) as client:
        offered = [m["value"] for m in client.post("/calib/grafana/metrics", json={}).json()]
        assert offered[-3:] == ["rec17", "rec18", "sources"]
        for target in offered[:-1]:  # a range without the fit: no frames, and no refusal
            assert query(client, target, style="full") == [], target


def test_variables_are_the_values_the_other_endpoints_take(client: TestClient) -> None:
    """POST /variable (a dashboard variable of type Query) was a 404 (specs/calib.md 6):
    its answer is ``[{"__text", "__value"}]``, which the datasource reads as a frame."""

    def values(target: object, **extra: object) -> list[dict[str, str]]:
        reply = client.post("/calib/grafana/variable", json={"payload": {"target": target}} | extra)
        assert reply.status_code == 200, reply.text
        found = reply.json()
        assert all(set(v) == {"__text", "__value"} for v in found)
        return found

    receivers = [v["__value"] for v in values("receivers")]
    offered = [m["value"] for m in client.post("/calib/grafana/metrics", json={}).json()]
    assert receivers == offered[:-1] and receivers[0] == "rec01"  # every target but sources
    assert [v["__value"] for v in values("sources")] == ["ANY", "HydA", "PicA"]
    assert [v["__value"] for v in values("channels")] == ["ANY", *map(str, range(109, 133))]
    assert [v["__value"] for v in values("styles")] == [value for _, value in grafana.STYLES]
    # Calibrator observations with a fit, newest first; within the dashboard's range.
    assert [v["__value"] for v in values("obsids")] == [str(t) for t in reversed(FIT_TIMES)]
    span = {"from": gps_to_utc_iso(FIT_TIMES[1] - 10) + "Z", "to": gps_to_utc_iso(FIT_TIMES[1] + 10) + "Z",
            "raw": {"from": "now-7d", "to": "now"}}  # fmt: skip
    assert [v["__value"] for v in values("obsids", range=span)] == [str(FIT_TIMES[1])]
    tiles = values("tiles")
    assert len(tiles) == 128 and {TILES[0].tile_name, TILES[1].tile_name} <= {
        v["__value"] for v in tiles
    }
    # The variable editor's JSON mode can send the target's name alone.
    as_text = client.post("/calib/grafana/variable", json={"payload": "sources"})
    assert [v["__value"] for v in as_text.json()] == ["ANY", "HydA", "PicA"]


def test_ad_hoc_filters_are_none(client: TestClient) -> None:
    """POST /tag-keys and /tag-values were 404s: the queries apply no ad-hoc filter, so
    there are no keys, and no values of any key."""
    for body in ({}, {"filters": [], "timeRange": {"from": "now-6h", "to": "now"}}):
        reply = client.post("/calib/grafana/tag-keys", json=body)
        assert reply.status_code == 200 and reply.json() == []
    assert client.post("/calib/grafana/tag-keys", content=b"").json() == []
    reply = client.post("/calib/grafana/tag-values", json={"key": "City"})
    assert reply.status_code == 200 and reply.json() == []


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("variable", {}, "payload.target"),
        ("variable", {"payload": {"target": "planets"}}, "payload.target"),
        ("variable", {"payload": {"target": 3}}, "payload.target"),
        ("variable", {"payload": [1]}, "payload.target"),
        ("variable", {"payload": {"target": "obsids"}, "range": {"from": "yesterday"}}, "range"),
        ("tag-values", {}, "key"),
        ("tag-values", {"key": 5}, "key"),
        ("tag-keys", [1], "JSON object"),
    ],
)
def test_malformed_variable_and_tag_requests_are_400s(
    client: TestClient, path: str, body: object, named: str
) -> None:
    reply = client.post(f"/calib/grafana/{path}", json=body)
    assert reply.status_code == 400 and named in reply.json()["error"], reply.text
    not_json = client.post(f"/calib/grafana/{path}", content=b"{not json")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]


def test_malformed_targets_and_null_payload_values(client: TestClient) -> None:
    """``"targets": {}`` (an object, not a list) answered 200 ``[]``, as did ``"source":
    null`` (read as the calibrator named "None"). A malformed query is a 400 naming what
    is wrong; a null value is an absent one."""
    span = {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"}
    for targets, named in (
        ({}, "targets must be a list"),
        ({"target": "rec01"}, "not an object"),
        ("", "not a string"),
        (0, "not a number"),
        ([{"target": "rec01", "payload": {"source": ["HydA"]}}], "payload source"),
        ([{"target": "rec01", "payload": {"style": {}}}], "payload style"),
        ([{"target": "rec01", "payload": {"channel": True}}], "payload channel"),
    ):
        reply = client.post("/calib/grafana/query", json={"range": span, "targets": targets})
        assert reply.status_code == 400, (targets, reply.text)
        assert named in reply.json()["error"], (targets, reply.text)
    for absent in ({"range": span}, {"range": span, "targets": None}):
        reply = client.post("/calib/grafana/query", json=absent)
        assert reply.status_code == 200 and reply.json() == []
    explicit = query(client, f"rec{RX:02d}", style="full", source="ANY", channel="ANY", clip="None")
    nulls = query(client, f"rec{RX:02d}", style=None, source=None, channel=None, clip=None)
    assert nulls == explicit and len(explicit) == 2 * len(TILES)
    assert query(client, f"rec{RX:02d}", style="full", channel=120) == explicit  # a number
