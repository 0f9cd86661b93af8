"""find and show in a real browser (headless Chromium) against a real server."""

from __future__ import annotations

import json
from pathlib import Path

from browser import browser_page, screenshot
from observatory.cli import main
from observatory.clients import trigger as ts
from observatory.core.gpstime import now_gps
from observatory.telescope import sky
from servers import free_port, observatory_server, wait_for


def test_find_and_show_in_chromium(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert main(["--data-dir", str(data_dir), "projects", "create", "G0055", "--priority", "5",
                 "--secure-key", "page-test-key"]) == 0  # fmt: skip
    port = free_port()
    server = observatory_server(data_dir, port)
    base = f"http://127.0.0.1:{port}/trigger/"
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        ra = round(float(sky.local_apparent_sidereal_deg([now_gps()])[0]), 3)
        real = ts.trigger(project_id="G0055", secure_key="page-test-key", ra=ra, dec=-26.7, nobs=2,
                          exptime=8, obsname="GRB page test", creator="browser", pretend=False, base_url=base)  # fmt: skip
        refused = ts.trigger(project_id="G0055", secure_key="wrong", ra=ra, dec=-26.7, obsname="bad key",
                             base_url=base)  # fmt: skip
        pretend = ts.trigger(project_id="G0055", secure_key="page-test-key", ra=ra, dec=-26.7, nobs=1,
                             obsname="GRB pretend", base_url=base)  # fmt: skip
        assert real and refused and pretend and real["success"] and not refused["success"]

        with browser_page() as page:
            page.goto(f"{base}find")
            assert page.title() == "Find triggers"
            for label in (
                "Trigger ID",
                "Mode",
                "Pretend",
                "Success",
                "Project",
                "Creator (% wildcard)",
            ):
                assert page.get_by_label(label).count() == 1, label
            assert page.locator("#results").count() == 0
            screenshot(page, "trigger-find-form", tmp_path)

            page.get_by_label("Observation name (% wildcard)").fill("GRB%")
            page.get_by_label("Page size").fill("1")
            page.get_by_role("button", name="Search").click()
            page.wait_for_selector("#results")
            rows = page.locator("#results tr")
            assert rows.count() == 2  # header + one trigger per page
            assert str(real["trigger_id"]) in rows.nth(1).inner_text()
            obs_link = page.locator(f"a[href*='obs_page?obs_id={real['obsid_list'][0]}']")
            assert obs_link.count() == 1
            screenshot(page, "trigger-find-page-1", tmp_path)

            page.locator("#next").click()
            page.wait_for_selector("#results")
            assert str(pretend["trigger_id"]) in page.locator("#results tr").nth(1).inner_text()
            assert page.locator("#previous").count() == 1 and page.locator("#next").count() == 0
            screenshot(page, "trigger-find-page-2", tmp_path)

            page.goto(f"{base}find?html=1&success=false")
            row = page.locator("#results tr").nth(1)
            assert "secure_key is not the key" in row.inner_text()
            row.get_by_role("link", name=str(refused["trigger_id"])).click()
            shown = json.loads(page.locator("body").inner_text())
            assert shown["trigger_id"] == refused["trigger_id"] and shown["success"] is False
            assert screenshot(page, "trigger-show", tmp_path).stat().st_size > 0
    finally:
        server.stop()
