"""What the streaming writers share: the output's description as pyuvdata sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from observatory.preprocess.reader import ObservationMeta, prepare_pyuvdata
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ

#: AIPS polarisation codes of XX, XY, YX, YY (the chunk order).
POLARIZATION_CODES = [-5, -7, -8, -6]


@dataclass(frozen=True)
class OutputDescription:
    """What a conversion's output holds, apart from the visibilities.

    Attributes
    ----------
    time_centres_gps_s
        Centre of each output integration.
    phase_centre
        (name, RA deg, Dec deg) of the phase centre recorded with the data.
    native_times
        The observation's integrations the output holds (its last averaging bin may hold
        fewer than the others: Birli's ``num_sel_timesteps``).
    """

    meta: ObservationMeta
    time_centres_gps_s: NDArray[np.float64]
    freqs_hz: NDArray[np.float64]
    channel_width_hz: float
    int_time_s: float
    phase_centre: tuple[str, float, float]
    history: str
    native_times: int
    calibrated: bool = False


def to_uvdata(
    description: OutputDescription,
    vis: NDArray[np.complex64] | None = None,
    weights: NDArray[np.float32] | None = None,
    flags: NDArray[np.bool_] | None = None,
) -> Any:
    """A pyuvdata ``UVData`` of the output (uvw from the antenna positions).

    With ``vis``, ``weights`` and ``flags`` (each of shape (n_times, n_baselines,
    n_chans, 4), baselines in chunk order) it holds the data; without, it is
    metadata-only (what the streaming writers need: every baseline-time's
    coordinates, none of the visibilities).
    """
    from astropy.time import Time
    from pyuvdata import Telescope, UVData

    from observatory.telescope.site import mwa_location

    meta = description.meta
    location = mwa_location()
    telescope = Telescope.new(
        name="MWA",
        location=location,
        antenna_positions=antenna_positions_ecef(meta, location),
        antenna_names=list(meta.antenna_names),
        # Metafits Antenna indices (uvfits stores them 1-based, as Birli writes them): real
        # tile ids go past 255, which forces uvfits into 2048-baseline indexing that
        # CASA's importuvfits cannot read, and would leave empty MS ANTENNA rows.
        antenna_numbers=list(range(meta.n_ants)),
        instrument="MWA",
        x_orientation="east",
        feeds=["x", "y"],
        mount_type="phased",
        antenna_diameters=np.full(meta.n_ants, 4.0),
        update_from_known=False,
    )
    p, q = meta.baseline_antennas()
    name, ra_deg, dec_deg = description.phase_centre
    catalog = {
        0: {
            "cat_name": name,
            "cat_type": "sidereal",
            "cat_lon": np.deg2rad(ra_deg),
            "cat_lat": np.deg2rad(dec_deg),
            "cat_frame": "icrs",
            "cat_epoch": 2000.0,
        }
    }
    n_blts = len(description.time_centres_gps_s) * meta.n_baselines
    arrays = {}
    if vis is not None and weights is not None and flags is not None:
        n_chans = vis.shape[2]
        arrays = {
            "data_array": vis.reshape(n_blts, n_chans, 4),
            "flag_array": flags.reshape(n_blts, n_chans, 4),
            "nsample_array": weights.reshape(n_blts, n_chans, 4),
        }
    prepare_pyuvdata()  # UVData.new computes uvw, and says so
    uvd = UVData.new(
        freq_array=description.freqs_hz,
        polarization_array=POLARIZATION_CODES,
        times=Time(description.time_centres_gps_s, format="gps").utc.jd,
        telescope=telescope,
        antpairs=np.stack([p, q], axis=1),
        do_blt_outer=True,
        time_axis_faster_than_bls=False,
        integration_time=description.int_time_s,
        channel_width=description.channel_width_hz,
        phase_center_catalog=catalog,
        phase_center_id_array=np.zeros(n_blts, dtype=int),
        history=description.history,
        vis_units="Jy" if description.calibrated else "uncalib",
        flex_spw_id_array=spectral_window_ids(description.freqs_hz, description.channel_width_hz),
        **arrays,
    )
    uvd.object_name = meta.obs_name or str(meta.obsid)
    uvd.extra_keywords["OBSID"] = meta.obsid
    return uvd


def spectral_window_ids(
    freqs_hz: NDArray[np.float64], channel_width_hz: float
) -> NDArray[np.intp] | None:
    """One window when the channels are contiguous, else one per coarse channel (None: one)."""
    if len(freqs_hz) < 2 or np.allclose(np.diff(freqs_hz), channel_width_hz):
        return None
    return np.floor(freqs_hz / COARSE_CHAN_WIDTH_HZ + 0.5).astype(np.intp)


def antenna_positions_ecef(meta: ObservationMeta, location: Any) -> NDArray[np.float64]:
    """Antenna positions relative to the array centre, ECEF metres (pyuvdata's convention)."""
    from pyuvdata.utils import ECEF_from_ENU

    ecef = ECEF_from_ENU(meta.enu_m, center_loc=location)
    centre = np.array([c.to_value("m") for c in location.geocentric])
    return np.asarray(ecef - centre, dtype=np.float64)
