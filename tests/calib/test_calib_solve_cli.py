"""``observatory calib-solve`` on data with nothing to solve: a failure, as the pipeline's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from observatory.calib.solver import normal_matrices, stefcal


def test_a_channel_without_data_is_not_reported_converged() -> None:
    """A flagged channel (no data in it) was reported converged, with precision 0, after
    one iteration of nothing: the solve of nothing looked like a perfect one."""
    n_ant, n_time, n_chan = 4, 2, 3
    ant1, ant2 = np.triu_indices(n_ant, k=1)
    shape = (n_time, len(ant1), n_chan, 2)
    model = np.full(shape, 2.0 + 0j)
    weights = np.ones(shape)
    weights[:, :, 1] = 0.0  # channel 1 flagged for every baseline
    big_a, big_b = normal_matrices(model, model, ant1, ant2, n_ant, weights)
    solution = stefcal(big_a, big_b)
    assert solution.converged[[0, 2]].all()
    assert not solution.converged[1].any()
    assert np.isnan(solution.precision[1]).all() and (solution.iterations[1] == 0).all()
    assert np.isnan(solution.gains[1]).all()


def test_calib_solve_fails_when_no_chanblock_is_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1320409688's mini file holds one fine channel, flagged (it is its coarse channel's
    edge): calib-solve wrote an all-NaN npz and exited 0, where the pipeline fails."""
    from observatory.cli import main
    from shared_data import MWA_DATA

    out = tmp_path / "x.npz"
    status = main([
        "calib-solve", "--metafits", str(MWA_DATA / "1320409688.metafits"),
        str(MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"),
        "--source", "3C444", "--out", str(out),
    ])  # fmt: skip
    assert status == 2
    assert not out.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "observation 1320409688 has 0 usable chanblock(s)" in err
    assert "a delay fit needs at least 2" in err
