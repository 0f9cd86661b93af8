"""The last, partial time-averaging bin is written as Birli (marlu) writes it.

marlu's writers take every output time from ``VisContext::timeseries(true, true)``, a
regular grid of full bins from the first integration, and write ``INTERVAL`` and
``EXPOSURE`` (uvfits ``INTTIM``) as the full averaging time for every row, the partial
last bin included; the bin's averaged weights carry how much data it holds. The
conversion does the same (docs/preprocess.md, "Time averaging").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.time import Time
from casacore.tables import table
from pyuvdata import UVData

from observatory.preprocess.engine import preprocess
from observatory.preprocess.options import ConversionOptions
from observatory.telescope.simulator import SimulatedObservation, simulate_observation

OBSID = 1320409688
INT_TIME_S = 2.0
N_TIMES = 3  # averaged in pairs: one full bin and one holding a single integration
RAW = {
    "no_rfi": "true", "no_geometric_delay": "true", "no_cable_delay": "true",
    "no_digital_gains": "true", "no_passband_gains": "true", "flag_edge_width": "0",
}  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservation:
    return simulate_observation(
        tmp_path_factory.mktemp("sim"), OBSID, n_tiles=4, int_time_s=INT_TIME_S,
        n_timesteps=N_TIMES, sources=[(333.6, -17.0, 10.0, -0.8)],
    )  # fmt: skip


def test_the_last_partial_bin_is_on_birlis_grid_and_its_weights_say_what_it_holds(
    sim: SimulatedObservation, tmp_path: Path
) -> None:
    options = ConversionOptions.from_params(
        {**RAW, "avg_time_res": str(2 * INT_TIME_S), "output": "both"}
    )
    paths = preprocess(sim.metafits_path, sim.vis_paths, options, tmp_path / "out")
    (ms_path,) = [p for p in paths if p.suffix == ".ms"]
    (uvfits_path,) = [p for p in paths if p.suffix == ".uvfits"]
    start_gps = float(OBSID)
    bin_s = 2 * INT_TIME_S
    # Full bins from the first integration: the second, holding only the third
    # integration, is centred where a full bin would be (start + 6 s, the observation's end).
    expected_gps = start_gps + bin_s * np.array([0.5, 1.5])

    uvd = UVData.from_file(str(uvfits_path))
    times_gps = Time(np.unique(uvd.time_array), format="jd").gps
    np.testing.assert_allclose(times_gps, expected_gps, rtol=0, atol=1e-3)
    np.testing.assert_allclose(uvd.integration_time, bin_s)
    nsamples = [uvd.nsample_array[uvd.time_array == t] for t in np.unique(uvd.time_array)]
    # One integration of two: half the weight of the full bin.
    np.testing.assert_allclose(nsamples[1], nsamples[0] / 2, rtol=1e-6)

    with table(str(ms_path), ack=False) as main:
        interval = main.getcol("INTERVAL")
        exposure = main.getcol("EXPOSURE")
        times_mjd_s = np.unique(main.getcol("TIME"))
        centroids_mjd_s = np.unique(main.getcol("TIME_CENTROID"))
    np.testing.assert_allclose(interval, bin_s)
    np.testing.assert_allclose(exposure, bin_s)
    ms_gps = Time(times_mjd_s / 86400.0, format="mjd", scale="utc").gps
    np.testing.assert_allclose(ms_gps, expected_gps, rtol=0, atol=1e-3)
    np.testing.assert_allclose(centroids_mjd_s, times_mjd_s, rtol=0, atol=1e-6)
    with table(str(ms_path / "OBSERVATION"), ack=False) as observation:
        # Birli's num_sel_timesteps + 1: the 3 integrations, not the 4 of two full bins
        assert observation.getcol("MWA_FLAG_WINDOW_SIZE").tolist() == [N_TIMES + 1]
