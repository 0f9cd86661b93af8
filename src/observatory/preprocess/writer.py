"""Writing converted visibilities as uvfits or a CASA measurement set, through pyuvdata."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from observatory.preprocess.reader import ObservationMeta
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ

#: AIPS polarisation codes of XX, XY, YX, YY (the chunk order).
POLARIZATION_CODES = [-5, -7, -8, -6]


@dataclass
class ConvertedData:
    """The whole output of a conversion, ready to write.

    Attributes
    ----------
    vis, weights, flags
        Shape (n_times, n_baselines, n_chans, 4), baselines in chunk order.
    time_centres_gps_s
        Centre of each output integration.
    phase_centre
        (name, RA deg, Dec deg) of the phase centre recorded with the data.
    """

    meta: ObservationMeta
    vis: NDArray[np.complex64]
    weights: NDArray[np.float32]
    flags: NDArray[np.bool_]
    time_centres_gps_s: NDArray[np.float64]
    freqs_hz: NDArray[np.float64]
    channel_width_hz: float
    int_time_s: float
    phase_centre: tuple[str, float, float]
    history: str
    calibrated: bool = False


def to_uvdata(data: ConvertedData) -> Any:
    """A pyuvdata ``UVData`` holding the converted data (uvw from the antenna positions)."""
    from astropy.time import Time
    from pyuvdata import Telescope

    from observatory.telescope.site import mwa_location

    meta = data.meta
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
    antpairs = np.stack([p, q], axis=1)
    name, ra_deg, dec_deg = data.phase_centre
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
    jd = Time(data.time_centres_gps_s, format="gps").utc.jd
    with warnings.catch_warnings():
        # UVData.new computes uvw from the antenna positions, and says so.
        warnings.filterwarnings("ignore", message="Recalculating uvw_array")
        uvd = _new_uvdata(data, telescope, antpairs, catalog, jd)
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


def _new_uvdata(data: ConvertedData, telescope: Any, antpairs: Any, catalog: Any, jd: Any) -> Any:
    from pyuvdata import UVData

    n_times, n_bl, n_chans, n_pols = data.vis.shape
    return UVData.new(
        freq_array=data.freqs_hz,
        polarization_array=POLARIZATION_CODES,
        times=jd,
        telescope=telescope,
        antpairs=antpairs,
        do_blt_outer=True,
        time_axis_faster_than_bls=False,
        integration_time=data.int_time_s,
        channel_width=data.channel_width_hz,
        data_array=data.vis.reshape(n_times * n_bl, n_chans, n_pols),
        flag_array=data.flags.reshape(n_times * n_bl, n_chans, n_pols),
        nsample_array=data.weights.reshape(n_times * n_bl, n_chans, n_pols),
        phase_center_catalog=catalog,
        phase_center_id_array=np.zeros(n_times * n_bl, dtype=int),
        history=data.history,
        vis_units="Jy" if data.calibrated else "uncalib",
        flex_spw_id_array=spectral_window_ids(data.freqs_hz, data.channel_width_hz),
    )


def write_outputs(data: ConvertedData, outputs: list[Path]) -> list[Path]:
    """Write ``data`` to each path (``.uvfits`` or ``.ms``), each atomically.

    A measurement set is a directory: it is written beside the target under a
    temporary name and renamed into place, so a failed write leaves nothing.
    """
    uvd = to_uvdata(data)
    written = []
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            temporary = Path(tmp) / path.name
            if path.suffix.lower() == ".ms":
                with warnings.catch_warnings():
                    # Uncalibrated data are labelled so; pyuvdata warns that CASA may ignore it.
                    warnings.filterwarnings(
                        "ignore", message="Writing in the MS file that the units"
                    )
                    uvd.write_ms(str(temporary), clobber=True)
                if path.exists():
                    shutil.rmtree(path)
            else:
                uvd.write_uvfits(str(temporary))
            temporary.replace(path)
        written.append(path)
    return written


def antenna_positions_ecef(meta: ObservationMeta, location: Any) -> NDArray[np.float64]:
    """Antenna positions relative to the array centre, ECEF metres (pyuvdata's convention)."""
    from pyuvdata.utils import ECEF_from_ENU

    ecef = ECEF_from_ENU(meta.enu_m, center_loc=location)
    centre = np.array([c.to_value("m") for c in location.geocentric])
    return np.asarray(ecef - centre, dtype=np.float64)
