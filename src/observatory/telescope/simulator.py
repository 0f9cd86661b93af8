"""Simulated MWA observations: a metafits plus MWAX correlator FITS or MWAX VCS sub-files.

The files follow the real formats closely enough that mwalib (``MetafitsContext``,
``CorrelatorContext``, ``VoltageContext``) and pyuvdata (``file_type="mwa_corr_fits"``)
read them, and the injected truth (sky, gains, delays, flags, noise) is written
beside them as ``<obsid>_truth.json``.

Visibility convention
---------------------
Raw MWAX data are neither phase-tracked nor cable-corrected (``DELAYMOD =
'NODELAYS'``, ``CABLEDEL = GEODEL = 0``). For baseline (p, q), p <= q in
Antenna order, the file holds

    V_pq(f) = g_p(f) (M_pq(f) + noise) conj(g_q(f)),
    M_pq(f) = sum_k S_k(f) exp(-2 pi i f (tau_pk - tau_qk)),

where ``tau_pk = -(x_p . s_k) / c + L_p / c`` is the delay of source k's signal at
tile p: geometric (x_p the tile's East/North/Height position, s_k the unit vector
towards the source's apparent alt/az at the integration centre) plus the
metafits electrical cable length ``L_p`` (the ``EL_`` value, as signed there).
The per-tile gain is ``g_p = A_p,cc exp(-2 pi i f dtau_p)`` with an amplitude per
coarse channel and a delay error ``dtau_p``, separately for pols X and Y.
Point sources are unpolarised (XX = YY = S, XY = YX = 0 before noise) and there
is no primary beam (fluxes are apparent fluxes).

This is the convention pyuvdata implies: it conjugates MWAX data on reading
(so its unprojected data carry ``exp(+2 pi i w / lambda)`` with
``w = (x_q - x_p) . s``, the sign its ``phase()`` removes) and
``correct_cable_len`` multiplies the raw data by ``exp(-2 pi i f (L_q - L_p) / c)``,
which removes the cable term above exactly. In pyuvdata's (conjugated) domain
the same gains read ``V = G_p M conj(G_q)`` with ``G = conj(g) = A exp(+2 pi i f dtau)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import ArrayLike, NDArray

from observatory.core.gpstime import gps_to_unix, gps_to_utc_iso
from observatory.telescope import instrument
from observatory.telescope.instrument import (
    COARSE_CHAN_WIDTH_HZ,
    SPEED_OF_LIGHT_M_S,
    ULTRAFINE_CHAN_WIDTH_HZ,
    VCS_BLOCKS_PER_SUBOBS,
    VCS_SAMPLES_PER_BLOCK,
    VCS_SUBFILE_HEADER_BYTES,
    Tile,
)
from observatory.telescope.site import ensure_astropy_offline, mwa_location

__all__ = [
    "MODES",
    "MWAX_POLS",
    "CancelRequest",
    "PointSource",
    "SimulatedObservation",
    "SimulationCancelled",
    "SimulationTruth",
    "WrittenFile",
    "cancelled_by",
    "load_truth",
    "predict_visibilities",
    "simulate_observation",
]

#: Observation modes the simulator writes.
MODES = ("MWAX_CORRELATOR", "MWAX_VCS")
#: Polarisation order of MWAX visibilities (and of :func:`predict_visibilities`).
MWAX_POLS = ("XX", "XY", "YX", "YY")
#: Tile polarisations, in the order of the gain arrays.
TILE_POLS = ("X", "Y")

TRUTH_FORMAT = "observatory.simulation_truth/1"
#: db2fits starts a new file ("batch") once the current one reaches this size.
DEFAULT_FILE_SIZE_LIMIT_BYTES = 10 * 2**30
#: Smallest obsid whose file names match mwalib's ten-digit patterns.
MIN_OBSID = 1_000_000_000
#: At most this many visibility files are computed and written at once (memory bound).
MAX_WRITER_THREADS = 8
#: Standard deviation of simulated VCS voltages, in 8-bit counts.
VCS_RMS_COUNTS = 16.0

_FITS_BLOCK_BYTES = 2880
# Version strings of the real MWAX pipeline that wrote 1320409688 (pyuvdata requires the keys).
_U2S_VER = "2.03c-69"
_CBF_VER = "1.0.3"
_DB2F_VER = "0.10.2"

_CONVENTION = (
    "MWAX file domain: V_pq = g_p M_pq conj(g_q) + |g_p| |g_q| noise for p <= q "
    "(Antenna order; the autocorrelations' XX, YY also |g_p|^2 SEFD), "
    "M_pq = sum_k S_k exp(-2 pi i f (tau_pk - tau_qk)), tau_pk = -(x_p . s_k)/c + L_p/c "
    "(L_p = metafits EL_ length, included when cable_delays_in_data), "
    "g_p = A[p, pol, coarse] exp(-2 pi i f delay_error_ns[p, pol] 1e-9). "
    "pyuvdata conjugates on reading: V_uv = G_p M_uv conj(G_q) with G = conj(g)."
)


# ----------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class PointSource:
    """An unpolarised point source with a power-law spectrum.

    Attributes
    ----------
    ra_deg, dec_deg
        ICRS position.
    flux_jy_150mhz
        Flux density at 150 MHz.
    spectral_index
        ``S(f) = flux_jy_150mhz * (f / 150 MHz) ** spectral_index``.
    """

    ra_deg: float
    dec_deg: float
    flux_jy_150mhz: float
    spectral_index: float = -0.8
    name: str = ""

    def flux_jy(self, freq_hz: ArrayLike) -> NDArray[np.float64]:
        """Flux density (Jy) at ``freq_hz``."""
        return self.flux_jy_150mhz * (np.asarray(freq_hz, dtype=np.float64) / 150e6) ** (
            self.spectral_index
        )


@dataclass(frozen=True)
class WrittenFile:
    """One file the simulator wrote.

    Attributes
    ----------
    kind
        ``'metafits'``, ``'mwax_vis'``, ``'voltage'`` or ``'truth'``.
    coarse_chan
        Receiver channel number for data files, else None.
    batch
        MWAX batch number (``_000``) for visibility files, else None.
    gps_time_s
        Sub-observation GPS second for voltage files, else None.
    """

    path: Path
    kind: str
    size_bytes: int
    coarse_chan: int | None = None
    batch: int | None = None
    gps_time_s: int | None = None


@dataclass(frozen=True)
class RfiBurst:
    """Narrow-band interference added to every cross-correlation.

    A transmitter seen by all tiles: the same amplitude on every baseline with a
    seeded random phase per baseline, in fine channels ``fine_chans`` of coarse
    channel ``coarse_chan`` during integrations ``timesteps`` (index ranges,
    stop exclusive), on XX and YY.
    """

    coarse_chan: int
    fine_chans: tuple[int, int]
    timesteps: tuple[int, int]
    amplitude_jy: float


@dataclass(frozen=True, eq=False)
class SimulationTruth:
    """Everything injected into a simulated observation (``<obsid>_truth.json``).

    Gain arrays are indexed ``[antenna, pol]`` with pol 0 = X, 1 = Y; amplitudes
    also by coarse channel in ``coarse_chans`` order. See the module docstring
    for the visibility convention.
    """

    obsid: int
    mode: str
    int_time_s: float
    n_timesteps: int
    coarse_chans: tuple[int, ...]
    fine_chan_width_hz: int
    tiles: tuple[Tile, ...]
    pointing_ra_deg: float
    pointing_dec_deg: float
    pointing_az_deg: float
    pointing_alt_deg: float
    sources: tuple[PointSource, ...]
    gain_amplitudes: NDArray[np.float64]
    delay_errors_ns: NDArray[np.float64]
    flagged_antennas: tuple[int, ...]
    noise_sigma_jy: float
    seed: int
    cable_delays_in_data: bool
    vcs_rms_counts: float = VCS_RMS_COUNTS
    #: Receiver digital gains (1 = unity, in steps of 1/64 as the metafits stores them),
    #: shape (n_tiles, 2, n_coarse); None means unity.
    digital_gains: NDArray[np.float64] | None = None
    quack_time_s: float = 0.0
    rfi: tuple[RfiBurst, ...] = ()
    convention: str = _CONVENTION

    @property
    def n_tiles(self) -> int:
        """Number of tiles (antennas)."""
        return len(self.tiles)

    @property
    def timestep_duration_s(self) -> float:
        """Length of one timestep: the integration, or an 8 s sub-file for VCS."""
        return float(instrument.MWAX_SUBOBS_S) if self.mode == "MWAX_VCS" else self.int_time_s

    @property
    def system_sefd_jy(self) -> float:
        """The system equivalent flux density that makes ``noise_sigma_jy`` (Jy).

        By the radiometer equation a baseline's noise per real and imaginary part is
        ``SEFD / sqrt(2 bandwidth t)`` for one fine channel and integration; the
        autocorrelations carry the SEFD itself (times the tile's gain squared).
        """
        return self.noise_sigma_jy * math.sqrt(2.0 * self.fine_chan_width_hz * self.int_time_s)

    def timestep_centres_gps(self) -> NDArray[np.float64]:
        """GPS time (s) of the centre of each timestep."""
        offsets_s = (np.arange(self.n_timesteps, dtype=np.float64) + 0.5) * self.timestep_duration_s
        return np.asarray(self.obsid + offsets_s, dtype=np.float64)

    def fine_chan_freqs_hz(self, coarse_chan: int) -> NDArray[np.float64]:
        """Centre frequencies of the fine channels of receiver channel ``coarse_chan``."""
        self._coarse_index(coarse_chan)
        return instrument.fine_chan_freqs_hz(coarse_chan, self.fine_chan_width_hz)

    def complex_gains(self, coarse_chan: int, domain: str = "mwax") -> NDArray[np.complex128]:
        """Injected complex gains, shape (n_tiles, 2 pols, n_fine).

        ``domain='mwax'`` gives ``g = A exp(-2 pi i f dtau)`` (raw-file domain);
        ``'uvdata'`` its conjugate, the gain in pyuvdata's ``V = G_p M conj(G_q)``.
        """
        cc = self._coarse_index(coarse_chan)
        freqs_hz = self.fine_chan_freqs_hz(coarse_chan)
        phase = -2j * np.pi * freqs_hz[None, None, :] * (self.delay_errors_ns[:, :, None] * 1e-9)
        gains = self.gain_amplitudes[:, :, cc, None] * np.exp(phase)
        if domain == "mwax":
            return gains
        if domain == "uvdata":
            return np.conj(gains)
        raise ValueError(f"domain {domain!r} is not 'mwax' or 'uvdata'")

    def _coarse_index(self, coarse_chan: int) -> int:
        try:
            return self.coarse_chans.index(int(coarse_chan))
        except ValueError:
            raise ValueError(
                f"coarse_chan {coarse_chan} is not simulated (have {list(self.coarse_chans)})"
            ) from None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (floats round-trip exactly)."""
        flagged = set(self.flagged_antennas)
        return {
            "format": TRUTH_FORMAT,
            "obsid": self.obsid,
            "mode": self.mode,
            "int_time_s": self.int_time_s,
            "n_timesteps": self.n_timesteps,
            "coarse_chans": list(self.coarse_chans),
            "fine_chan_width_hz": self.fine_chan_width_hz,
            "pointing": {
                "ra_deg": self.pointing_ra_deg,
                "dec_deg": self.pointing_dec_deg,
                "az_deg": self.pointing_az_deg,
                "alt_deg": self.pointing_alt_deg,
            },
            "tiles": [
                {
                    "antenna": t.antenna,
                    "tile_id": t.tile_id,
                    "tile_name": t.tile_name,
                    "rx": t.rx,
                    "slot": t.slot,
                    "input_y": t.input_y,
                    "input_x": t.input_x,
                    "cable_length_label": t.cable_length_label,
                    "cable_length_m": t.cable_length_m,
                    "east_m": t.east_m,
                    "north_m": t.north_m,
                    "height_m": t.height_m,
                    "flavor": t.flavor,
                    "flagged": t.antenna in flagged,
                }
                for t in self.tiles
            ],
            "sources": [
                {
                    "name": s.name,
                    "ra_deg": s.ra_deg,
                    "dec_deg": s.dec_deg,
                    "flux_jy_150mhz": s.flux_jy_150mhz,
                    "spectral_index": s.spectral_index,
                }
                for s in self.sources
            ],
            "gains": {
                "pols": list(TILE_POLS),
                "amplitude": self.gain_amplitudes.tolist(),
                "amplitude_axes": ["antenna", "pol", "coarse_chan"],
                "delay_error_ns": self.delay_errors_ns.tolist(),
                "delay_error_axes": ["antenna", "pol"],
            },
            "flagged_antennas": list(self.flagged_antennas),
            "noise_sigma_jy": self.noise_sigma_jy,
            "seed": self.seed,
            "cable_delays_in_data": self.cable_delays_in_data,
            "vcs_rms_counts": self.vcs_rms_counts,
            "convention": self.convention,
            "digital_gains": None if self.digital_gains is None else self.digital_gains.tolist(),
            "quack_time_s": self.quack_time_s,
            "rfi": [
                {
                    "coarse_chan": b.coarse_chan,
                    "fine_chans": list(b.fine_chans),
                    "timesteps": list(b.timesteps),
                    "amplitude_jy": b.amplitude_jy,
                }
                for b in self.rfi
            ],
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> SimulationTruth:
        """Inverse of :meth:`to_json_dict`.

        Raises
        ------
        ValueError
            If ``data`` is not a simulation truth of this format.
        """
        if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"truth format {found!r} is not {TRUTH_FORMAT!r}")
        try:
            return cls._from_checked_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"truth data is incomplete or malformed: {error!r}") from None

    @classmethod
    def _from_checked_dict(cls, data: dict[str, Any]) -> SimulationTruth:
        tiles = tuple(
            Tile(
                antenna=t["antenna"],
                tile_id=t["tile_id"],
                tile_name=t["tile_name"],
                rx=t["rx"],
                slot=t["slot"],
                input_y=t["input_y"],
                input_x=t["input_x"],
                cable_length_label=t["cable_length_label"],
                cable_length_m=t["cable_length_m"],
                north_m=t["north_m"],
                east_m=t["east_m"],
                height_m=t["height_m"],
                flavor=t["flavor"],
            )
            for t in data["tiles"]
        )
        pointing = data["pointing"]
        return cls(
            obsid=data["obsid"],
            mode=data["mode"],
            int_time_s=data["int_time_s"],
            n_timesteps=data["n_timesteps"],
            coarse_chans=tuple(data["coarse_chans"]),
            fine_chan_width_hz=data["fine_chan_width_hz"],
            tiles=tiles,
            pointing_ra_deg=pointing["ra_deg"],
            pointing_dec_deg=pointing["dec_deg"],
            pointing_az_deg=pointing["az_deg"],
            pointing_alt_deg=pointing["alt_deg"],
            sources=tuple(
                PointSource(
                    ra_deg=s["ra_deg"],
                    dec_deg=s["dec_deg"],
                    flux_jy_150mhz=s["flux_jy_150mhz"],
                    spectral_index=s["spectral_index"],
                    name=s["name"],
                )
                for s in data["sources"]
            ),
            gain_amplitudes=np.asarray(data["gains"]["amplitude"], dtype=np.float64).reshape(
                len(tiles), 2, len(data["coarse_chans"])
            ),
            delay_errors_ns=np.asarray(data["gains"]["delay_error_ns"], dtype=np.float64).reshape(
                len(tiles), 2
            ),
            flagged_antennas=tuple(data["flagged_antennas"]),
            noise_sigma_jy=data["noise_sigma_jy"],
            seed=data["seed"],
            cable_delays_in_data=data["cable_delays_in_data"],
            vcs_rms_counts=data.get("vcs_rms_counts", VCS_RMS_COUNTS),
            convention=data.get("convention", _CONVENTION),
            digital_gains=None
            if data.get("digital_gains") is None
            else np.asarray(data["digital_gains"], dtype=np.float64).reshape(
                len(tiles), 2, len(data["coarse_chans"])
            ),
            quack_time_s=data.get("quack_time_s", 0.0),
            rfi=tuple(
                RfiBurst(
                    b["coarse_chan"],
                    tuple(b["fine_chans"]),
                    tuple(b["timesteps"]),
                    b["amplitude_jy"],
                )
                for b in data.get("rfi", ())
            ),
        )


@dataclass(frozen=True, eq=False)
class SimulatedObservation:
    """What :func:`simulate_observation` wrote."""

    obsid: int
    out_dir: Path
    mode: str
    files: tuple[WrittenFile, ...]
    truth: SimulationTruth = field(repr=False)

    def _of_kind(self, kind: str) -> list[Path]:
        return [f.path for f in self.files if f.kind == kind]

    @property
    def metafits_path(self) -> Path:
        """The ``<obsid>.metafits`` file."""
        return self._of_kind("metafits")[0]

    @property
    def truth_path(self) -> Path:
        """The ``<obsid>_truth.json`` file."""
        return self._of_kind("truth")[0]

    @property
    def vis_paths(self) -> list[Path]:
        """MWAX visibility files, by batch then coarse channel."""
        return self._of_kind("mwax_vis")

    @property
    def voltage_paths(self) -> list[Path]:
        """VCS sub-files, by GPS time then coarse channel."""
        return self._of_kind("voltage")

    @property
    def total_bytes(self) -> int:
        """Bytes written, all files."""
        return sum(f.size_bytes for f in self.files)


def load_truth(path: str | os.PathLike[str]) -> SimulationTruth:
    """Read a ``<obsid>_truth.json`` file."""
    with open(path, encoding="utf-8") as handle:
        return SimulationTruth.from_json_dict(json.load(handle))


# ----------------------------------------------------------------------------------------------
# Physics: source directions and visibilities


def _sources_enu(
    truth: SimulationTruth, centres_gps: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Unit vectors (East, North, Up) towards each source, shape (n_times, n_sources, 3).

    Apparent alt/az at the MWA from astropy (no refraction). Also returns which
    sources are above the horizon, shape (n_times, n_sources): the others are
    blocked and contribute nothing.
    """
    n_src = len(truth.sources)
    if n_src == 0:
        return np.zeros((len(centres_gps), 0, 3)), np.zeros((len(centres_gps), 0), dtype=bool)
    ensure_astropy_offline()
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    location = mwa_location()
    times = Time(centres_gps[:, None], format="gps", location=location)
    sky = SkyCoord(
        ra=np.array([s.ra_deg for s in truth.sources])[None, :] * u.deg,
        dec=np.array([s.dec_deg for s in truth.sources])[None, :] * u.deg,
        frame="icrs",
    )
    altaz = sky.transform_to(AltAz(obstime=times, location=location))
    alt = altaz.alt.to_value(u.rad)
    az = altaz.az.to_value(u.rad)
    enu = np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)
    return enu, alt > 0.0


def _gaussian_noise(rng: np.random.Generator, n_values: int) -> NDArray[np.float32]:
    """``n_values`` (even) standard normal float32 numbers by the Box-Muller transform.

    About 2.5 times faster than ``Generator.standard_normal`` for float32, which
    matters because noise is the largest cost of a simulated integration.
    """
    half = n_values // 2
    values = rng.random(2 * half, dtype=np.float32)
    radius, angle = values[:half], values[half:]
    np.log1p(-radius, out=radius)  # uniform in [0, 1): log1p(-u) is finite
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    angle *= np.float32(2.0 * np.pi)
    out = np.empty(2 * half, dtype=np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle), out=out[half:])
    return out


class _VisibilityEngine:
    """Vectorised visibilities of one observation, one (timestep, coarse channel) at a time."""

    def __init__(self, truth: SimulationTruth) -> None:
        self.truth = truth
        n_ant = truth.n_tiles
        enu_m = np.array([t.enu_m for t in truth.tiles], dtype=np.float64).reshape(n_ant, 3)
        # A common offset cancels in every baseline; removing it keeps phases small and exact.
        self.enu_m = enu_m - enu_m.mean(axis=0)
        self.cable_delay_s = np.array([t.cable_length_m for t in truth.tiles]) / SPEED_OF_LIGHT_M_S
        p_idx, q_idx = np.triu_indices(n_ant)  # row-major upper triangle = MWAX baseline order
        self.p_idx, self.q_idx = p_idx, q_idx
        self.upper_flat = p_idx * n_ant + q_idx  # index into a flattened n_ant x n_ant matrix
        self.auto_rows = np.flatnonzero(p_idx == q_idx)
        self.flagged = np.zeros(n_ant, dtype=bool)
        self.flagged[list(truth.flagged_antennas)] = True
        self.n_baselines = len(p_idx)
        self.n_fine = COARSE_CHAN_WIDTH_HZ // truth.fine_chan_width_hz
        self.directions, self.above_horizon = _sources_enu(truth, truth.timestep_centres_gps())
        self.freqs_hz = {c: truth.fine_chan_freqs_hz(c) for c in truth.coarse_chans}
        self.fluxes_jy = {
            c: np.array([s.flux_jy(f) for s in truth.sources]).reshape(len(truth.sources), len(f)).T
            for c, f in self.freqs_hz.items()
        }  # (n_fine, n_src)

    def weights(self) -> NDArray[np.float32]:
        """MWAX weights [baseline][pol]: 1 everywhere.

        The correlator's weights say how much of each integration arrived; it does not know
        the metafits' tile flags, so real files give a flagged tile's baselines weight 1 too.
        """
        return np.ones((self.n_baselines, 4), dtype=np.float32)

    def visibilities(
        self,
        timestep: int,
        coarse_chan: int,
        *,
        include_cable: bool,
        include_gains: bool = True,
        include_noise: bool = True,
        include_digital_gains: bool = True,
        include_rfi: bool = True,
    ) -> NDArray[np.complex64]:
        """Raw-file visibilities, shape (n_baselines, n_fine, 4 pols), C-contiguous complex64."""
        truth = self.truth
        freqs_hz = self.freqs_hz[coarse_chan]
        shape = (self.n_baselines, self.n_fine, 4)
        delay_s = np.zeros((truth.n_tiles, 2))
        if include_cable:
            delay_s += self.cable_delay_s[:, None]
        if include_gains:
            delay_s += truth.delay_errors_ns * 1e-9
            amplitude = truth.gain_amplitudes[:, :, truth._coarse_index(coarse_chan)]
        else:
            amplitude = np.ones((truth.n_tiles, 2))
        if include_digital_gains and truth.digital_gains is not None:
            amplitude = amplitude * truth.digital_gains[:, :, truth._coarse_index(coarse_chan)]

        sigma = truth.noise_sigma_jy if include_noise else 0.0
        if sigma > 0.0:
            seed = np.random.SeedSequence(truth.seed, spawn_key=(0, coarse_chan, timestep))
            noise = _gaussian_noise(
                np.random.Generator(np.random.SFC64(seed)), 2 * math.prod(shape)
            )
            vis = noise.view(np.complex64).reshape(shape)
            # The noise is the receivers', before their gains, as the sky is: a baseline's
            # scales with both tiles' gains (XX, XY, YX, YY: X X, X Y, Y X, Y Y), and by the
            # radiometer equation an autocorrelation's XX and YY are sqrt(2) noisier than a
            # baseline's (their imaginary parts are dropped below).
            first, second = amplitude[self.p_idx], amplitude[self.q_idx]  # (n_baselines, 2)
            scale = sigma * np.stack(
                [first[:, 0] * second[:, 0], first[:, 0] * second[:, 1],
                 first[:, 1] * second[:, 0], first[:, 1] * second[:, 1]], axis=1,
            )  # fmt: skip
            scale[self.auto_rows[:, None], [0, 3]] *= math.sqrt(2.0)
            vis *= scale.astype(np.float32)[:, None, :]
        else:
            vis = np.zeros(shape, dtype=np.complex64)

        # Per-tile, per-pol factor e = gain x cable phase, (2, n_fine, n_ant), in float64 so
        # large phases stay exact before the products drop to complex64.
        tile_factor = amplitude.T[:, None, :] * np.exp(
            -2j * np.pi * freqs_hz[None, :, None] * delay_s.T[:, None, :]
        )
        # A flagged tile is a dead one: its receiver's noise and nothing of the sky.
        tile_factor[:, :, self.flagged] = 0.0

        if truth.sources:
            geometric_delay_s = -(self.enu_m @ self.directions[timestep].T) / SPEED_OF_LIGHT_M_S
            # (n_fine, n_ant, n_src) phasors of each source at each tile.
            fringe = np.exp(-2j * np.pi * freqs_hz[:, None, None] * geometric_delay_s[None, :, :])
            visible = self.above_horizon[timestep]
            sqrt_flux = np.sqrt(self.fluxes_jy[coarse_chan] * visible)[:, None, :]
            for pol_index, vis_pol in ((0, 0), (1, 3)):  # XX from X, YY from Y
                field = (tile_factor[pol_index][:, :, None] * fringe * sqrt_flux).astype(
                    np.complex64
                )
                # sum_k E_pk conj(E_qk) for all (p, q) at once: a batched matrix product.
                correlation = field @ np.conj(field).transpose(0, 2, 1)
                upper = np.take(correlation.reshape(len(freqs_hz), -1), self.upper_flat, axis=1)
                vis[:, :, vis_pol] += upper.T

        if include_rfi:
            self._add_rfi(vis, timestep, coarse_chan)
        # Autocorrelations are Hermitian: XX, YY real and YX = conj(XY). They also hold the
        # power of the noise itself, the system's SEFD, which makes them positive as real
        # ones are.
        autos = vis[self.auto_rows]
        autos[:, :, 2] = np.conj(autos[:, :, 1])
        if sigma > 0.0:
            system_power_jy = amplitude.T**2 * truth.system_sefd_jy  # (2 pols, n_ant)
            autos[:, :, 0] += system_power_jy[0][:, None]
            autos[:, :, 3] += system_power_jy[1][:, None]
        autos[:, :, 0].imag = 0.0
        autos[:, :, 3].imag = 0.0
        vis[self.auto_rows] = autos
        return vis

    def _add_rfi(self, vis: NDArray[np.complex64], timestep: int, coarse_chan: int) -> None:
        # A dead (flagged) tile picks up no interference either: only its receiver's noise.
        alive = ~(self.flagged[self.p_idx] | self.flagged[self.q_idx])
        for number, burst in enumerate(self.truth.rfi):
            start, stop = burst.timesteps
            if burst.coarse_chan != coarse_chan or not start <= timestep < stop:
                continue
            seed = np.random.SeedSequence(self.truth.seed, spawn_key=(2, number))
            phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, self.n_baselines)
            signal = (burst.amplitude_jy * alive * np.exp(1j * phase)).astype(np.complex64)
            chans = slice(*burst.fine_chans)
            vis[:, chans, 0] += signal[:, None]
            vis[:, chans, 3] += signal[:, None]


def predict_visibilities(
    truth: SimulationTruth,
    timestep: int,
    coarse_chan: int,
    *,
    domain: str = "mwax",
    include_cable: bool | None = None,
    include_gains: bool = True,
    include_noise: bool = False,
    include_digital_gains: bool = True,
    include_rfi: bool = True,
) -> NDArray[np.complex64]:
    """Visibilities the simulator writes (or would write) for one integration and coarse channel.

    Parameters
    ----------
    truth
        The simulation truth (from the result or :func:`load_truth`).
    timestep
        Integration index (0-based).
    coarse_chan
        Receiver channel number.
    domain
        ``'mwax'``: as stored in the files (and as mwalib ``read_by_baseline``
        returns them). ``'uvdata'``: conjugated, as pyuvdata's ``data_array``.
    include_cable
        Include the metafits cable-length phase. None: as in the files. Use
        False to compare with pyuvdata read with ``correct_cable_len=True``.
    include_gains
        Include the injected amplitudes and delay errors.
    include_digital_gains
        Include the receivers' digital gains (as the metafits lists them).
    include_rfi
        Include the RFI bursts.
    include_noise
        Add the (seeded, reproducible) noise that the files contain.

    Returns
    -------
    numpy.ndarray
        complex64, shape (n_baselines, n_fine, 4): MWAX baseline order and pols
        XX, XY, YX, YY. A flagged tile's baselines hold no sky (only noise, when included).
    """
    if truth.mode != "MWAX_CORRELATOR":
        raise ValueError(f"mode {truth.mode!r} has no visibilities")
    if not 0 <= timestep < truth.n_timesteps:
        raise ValueError(f"timestep {timestep} is out of range (0..{truth.n_timesteps - 1})")
    if domain not in ("mwax", "uvdata"):
        raise ValueError(f"domain {domain!r} is not 'mwax' or 'uvdata'")
    truth._coarse_index(coarse_chan)
    engine = _VisibilityEngine(truth)
    vis = engine.visibilities(
        timestep,
        coarse_chan,
        include_cable=truth.cable_delays_in_data if include_cable is None else include_cable,
        include_gains=include_gains,
        include_noise=include_noise,
        include_digital_gains=include_digital_gains,
        include_rfi=include_rfi,
    )
    return np.conj(vis) if domain == "uvdata" else vis


# ----------------------------------------------------------------------------------------------
# Cancellation


class SimulationCancelled(Exception):
    """A simulation stopped because its caller asked it to (``cancel``), before it finished.

    Nothing it wrote is left: neither finished files nor hidden ``.part`` files.
    """


#: How a caller asks a running simulation to stop: an event it sets, or a callable that
#: returns True from then on.
CancelRequest = threading.Event | Callable[[], bool]

#: The request that simulations started in this context obey when they are given none
#: (see :func:`cancelled_by`).
_CANCEL: contextvars.ContextVar[CancelRequest | None] = contextvars.ContextVar(
    "observatory_simulation_cancel", default=None
)


@contextlib.contextmanager
def cancelled_by(cancel: CancelRequest | None) -> Iterator[None]:
    """Make ``cancel`` stop every simulation started inside the block.

    For callers that reach :func:`simulate_observation` through code that passes no
    ``cancel`` of its own (the archive's ``observe_scheduled``, which the telescope
    runner calls): without it a recording could not be stopped before it had finished,
    up to a minute later.

    Parameters
    ----------
    cancel
        Set (or returning True) once the simulations should stop; None: they run to
        the end.
    """
    token = _CANCEL.set(cancel)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def _never() -> bool:
    return False


def _cancel_check(cancel: CancelRequest | None) -> Callable[[], bool]:
    """``cancel`` as a function that says whether to stop (cheap: it runs per integration)."""
    if cancel is None:
        return _never
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def _stop_if(cancelled: Callable[[], bool]) -> None:
    """Raise :class:`SimulationCancelled` once the caller asked to stop."""
    if cancelled():
        raise SimulationCancelled("simulation cancelled")


# ----------------------------------------------------------------------------------------------
# File writing


class _Writer:
    """Writes files atomically and removes everything it wrote if the run fails."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written: list[WrittenFile] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """Yield a temporary path in ``out_dir``; on success it becomes ``name``."""
        final = self.out_dir / name
        temp = self.out_dir / f".{name}.{secrets.token_hex(4)}.part"
        try:
            yield temp
            os.replace(temp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def record(self, name: str, kind: str, **where: int | None) -> None:
        path = self.out_dir / name
        item = WrittenFile(path, kind, path.stat().st_size, **where)
        with self.lock:
            self.written.append(item)

    def files(self) -> tuple[WrittenFile, ...]:
        """Written files in a stable order: kind, then batch or GPS time, then channel."""
        rank = {"metafits": 0, "mwax_vis": 1, "voltage": 1, "truth": 2}
        return tuple(
            sorted(
                self.written,
                key=lambda f: (
                    rank[f.kind],
                    f.batch if f.batch is not None else (f.gps_time_s or 0),
                    f.coarse_chan or 0,
                ),
            )
        )

    def remove_all(self) -> None:
        with self.lock:
            written, self.written = self.written, []
        for item in written:
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()


def _fits_header_bytes(cards: Sequence[tuple[str, Any, str]], primary: bool) -> bytes:
    from astropy.io import fits

    header = fits.Header()
    for key, value, comment in cards:
        if key == "COMMENT":
            header.add_comment(value)
        elif key == "HISTORY":
            header.add_history(value)
        else:
            header.append((key, value, comment), end=True)
    if primary:
        header.insert(0, ("SIMPLE", True, "conforms to FITS standard"))
    text = header.tostring(sep="", endcard=True, padding=True)
    return text.encode("ascii")


def _pad_bytes(n_bytes: int) -> bytes:
    return b"\0" * (-n_bytes % _FITS_BLOCK_BYTES)


def _hms(angle_deg: float) -> str:
    """``[-]hh:mm:ss.ss`` of an hour angle given in degrees (15 deg per hour)."""
    sign = "-" if angle_deg < 0 else ""
    centiseconds = round(abs(angle_deg) / 15.0 * 360_000)
    hours, rest = divmod(centiseconds, 360_000)
    minutes, rest = divmod(rest, 6_000)
    return f"{sign}{hours:02d}:{minutes:02d}:{rest / 100:05.2f}"


@dataclass(frozen=True)
class _Epoch:
    """Times and pointing quantities of the observation."""

    unix_start_s: int
    date_obs: str
    mjd: float
    lst_deg: float
    hour_angle: str
    az_deg: float
    alt_deg: float
    sun_dist_deg: float
    sun_alt_deg: float
    moon_dist_deg: float
    jupiter_dist_deg: float


def _epoch(obsid: int, duration_s: float, ra_deg: float, dec_deg: float) -> _Epoch:
    """Pointing alt/az, LST and hour angle at the observation's midpoint, as the MWA's
    current metafits give them (1369821496, 2023, VERSION 2.4; those of 2021, 1320409688,
    gave alt/az and HA at the start); start time strings."""
    ensure_astropy_offline()
    import astropy.units as u
    from astropy.coordinates import AltAz, HADec, SkyCoord, get_body
    from astropy.time import Time

    location = mwa_location()
    start = Time(obsid, format="gps", location=location)
    mid = Time(obsid + duration_s / 2.0, format="gps", location=location)
    pointing = SkyCoord(ra=ra_deg * u.deg, dec=dec_deg * u.deg, frame="icrs")
    altaz = pointing.transform_to(AltAz(obstime=mid, location=location))
    hadec = pointing.transform_to(HADec(obstime=mid, location=location))
    alt_deg = float(altaz.alt.to_value(u.deg))
    # At the zenith the azimuth means nothing: real metafits write 0.
    az_deg = 0.0 if round(alt_deg, 4) >= 90.0 else float(altaz.az.to_value(u.deg))
    sun = get_body("sun", mid, location)
    moon = get_body("moon", mid, location)
    jupiter = get_body("jupiter", mid, location)
    sun_altaz = sun.transform_to(AltAz(obstime=mid, location=location))
    return _Epoch(
        unix_start_s=round(gps_to_unix(obsid)),
        date_obs=gps_to_utc_iso(obsid)[:19],
        mjd=float(start.utc.mjd),
        lst_deg=float(mid.sidereal_time("apparent").to_value(u.deg)),
        # With the sign the MWA's metafits give it, RA - LST (the opposite of the usual
        # hour angle): 1369821496, pointed west of the meridian, holds HA = -01:25:02.
        hour_angle=_hms(-float(hadec.ha.wrap_at(180 * u.deg).to_value(u.deg))),
        az_deg=az_deg,
        alt_deg=alt_deg,
        sun_dist_deg=_separation_deg(sun, pointing),
        sun_alt_deg=float(sun_altaz.alt.to_value(u.deg)),
        moon_dist_deg=_separation_deg(moon, pointing),
        jupiter_dist_deg=_separation_deg(jupiter, pointing),
    )


def _freqcent_mhz(centre_chan: int) -> float:
    """The metafits FREQCENT of an observation whose CENTCHAN is ``centre_chan``.

    As the MWA's current metafits have it: CENTCHAN's lower edge (1369821496, 2023, a
    picket fence with CENTCHAN 115: 146.56 MHz). For a picket fence it is in CENTCHAN, not
    between the pickets where no channel is. (Metafits of 2021 add half of the fine channel
    width less 10 kHz: 1320409688, CENTCHAN 143 at 40 kHz, says 182.415.)
    """
    return round((centre_chan * COARSE_CHAN_WIDTH_HZ - COARSE_CHAN_WIDTH_HZ / 2) / 1e6, 6)


def _separation_deg(body: Any, pointing: Any) -> float:
    # Bodies are geocentric; compare directions in their frame, not the barycentric ICRS.
    return float(body.separation(pointing.transform_to(body.frame)).deg)


def _write_metafits(
    path: Path,
    truth: SimulationTruth,
    epoch: _Epoch,
    delays: NDArray[np.int64],
    pointing_delays: NDArray[np.int64],
    exposure_s: int,
    project_id: str,
    obs_name: str,
    calibrator: str,
    phase_centre_radec_deg: tuple[float, float],
    creator: str,
    atten_db: float,
    pointing_grid: tuple[str, int],
) -> None:
    from astropy.io import fits

    chans = truth.coarse_chans
    n_coarse = len(chans)
    n_fine = COARSE_CHAN_WIDTH_HZ // truth.fine_chan_width_hz
    quack_s = truth.quack_time_s
    n_scans = round(truth.n_timesteps * truth.timestep_duration_s / truth.int_time_s)
    primary = fits.PrimaryHDU()
    cards: list[tuple[str, Any, str]] = [
        ("GPSTIME", truth.obsid, "[s] GPS time of observation start"),
        ("EXPOSURE", exposure_s, "[s] duration of observation"),
        ("FILENAME", obs_name, "Name of observation"),
        ("MJD", epoch.mjd, "[days] MJD of observation"),
        ("DATE-OBS", epoch.date_obs, "[UT] Date and time of observation"),
        ("LST", epoch.lst_deg, "[deg] LST"),
        ("HA", epoch.hour_angle, "[hours] hour angle of pointing center"),
        ("AZIMUTH", round(epoch.az_deg, 4), "[deg] Azimuth of pointing center"),
        ("ALTITUDE", round(epoch.alt_deg, 4), "[deg] Altitude of pointing center"),
        ("RA", truth.pointing_ra_deg, "[deg] RA of pointing center"),
        ("DEC", truth.pointing_dec_deg, "[deg] Dec of pointing center"),
        ("RAPHASE", phase_centre_radec_deg[0], "[deg] RA of desired phase center"),
        ("DECPHASE", phase_centre_radec_deg[1], "[deg] DEC of desired phase center"),
        ("DELAYMOD", "NODELAYS", "MWAX correlator delay mode"),
        ("CABLEDEL", 0, ""),
        ("GEODEL", 0, ""),
        ("CALIBDEL", 0, ""),
        ("DELDESC", "No delays applied", ""),
        ("ATTEN_DB", atten_db, "[dB] global analogue attenuation, in dB"),
        ("SUN-DIST", epoch.sun_dist_deg, "[deg] Distance from pointing center to Sun"),
        ("MOONDIST", epoch.moon_dist_deg, "[deg] Distance from pointing center to Moon"),
        ("JUP-DIST", epoch.jupiter_dist_deg, "[deg] Distance from pointing center to Jupiter"),
        ("GRIDNAME", pointing_grid[0], "Pointing grid name"),
        ("GRIDNUM", pointing_grid[1], "Pointing grid number"),
        ("CREATOR", creator, "Observation creator"),
        ("PROJECT", project_id, "Project ID"),
        ("MODE", truth.mode, "Observation mode"),
        ("RECVRS", ",".join(map(str, instrument.receivers_of(truth.tiles))), "Active receivers"),
        ("DELAYS", ",".join(map(str, pointing_delays)), "Beamformer delays"),
        ("CALIBRAT", bool(calibrator), "Intended for calibration"),
        ("CALIBSRC", calibrator, "Calibrator source"),
        ("CENTCHAN", chans[n_coarse // 2], "Center coarse channel"),
        ("CHANNELS", ",".join(map(str, chans)), "Coarse channels"),
        ("CHANSEL", ",".join(map(str, range(n_coarse))), "Indices of selected coarse channels"),
        ("SUN-ALT", epoch.sun_alt_deg, "[deg] Altitude of Sun"),
        ("FINECHAN", truth.fine_chan_width_hz / 1000.0, "[kHz] Fine channel width"),
        ("INTTIME", truth.int_time_s, "[s] Individual integration time"),
        ("NAV_FREQ", max(1, round(truth.fine_chan_width_hz / 10_000)), "Assumed freq averaging"),
        ("NSCANS", n_scans, "Number of time instants in correlation products"),
        ("NINPUTS", 2 * truth.n_tiles, "Number of inputs into the correlation products"),
        ("NCHANS", n_coarse * n_fine, "Number of (averaged) fine channels in spectrum"),
        ("BANDWDTH", n_coarse * COARSE_CHAN_WIDTH_HZ / 1e6, "[MHz] Total bandwidth"),
        (
            "FREQCENT",
            _freqcent_mhz(chans[n_coarse // 2]),
            "[MHz] Center freq",
        ),
        ("TIMEOFF", 0, "[s] Deprecated, use QUACKTIM or GOODTIME"),
        ("DATESTRT", epoch.date_obs, "[UT] Date and time of correlations start"),
        ("RAWSCALE", 1.0, "Raw visibilities multiplied by this value"),
        ("VERSION", 2.11, "METAFITS version number"),
        ("TELESCOP", "MWA", ""),
        ("INSTRUME", "MWAX", ""),
        ("QUACKTIM", quack_s, "Seconds of bad data after observation starts"),
        ("GOODTIME", float(epoch.unix_start_s) + quack_s, "OBSID+QUACKTIME as Unix timestamp"),
        ("OVERSAMP", 0, "Oversampled PFB (1) or critically sampled (0)"),
        # The simulated passband is flat, so readers must not divide a PFB shape out.
        ("DERIPPLE", 1, "Passband flat (simulated)"),
    ]
    for key, value, comment in cards:
        primary.header[key] = (value, comment)
    primary.header.add_history(
        "Simulated by observatory.telescope.simulator (not a real observation)"
    )

    n_rows = 2 * truth.n_tiles
    flagged = set(truth.flagged_antennas)
    by_input = sorted(truth.tiles, key=lambda t: t.input_y)
    inputs = np.empty(n_rows, dtype=np.int16)
    rows_tile = [t for t in by_input for _ in TILE_POLS]
    inputs[0::2] = [t.input_y for t in by_input]
    inputs[1::2] = [t.input_x for t in by_input]
    pols = np.array(["Y", "X"] * truth.n_tiles)
    columns = [
        fits.Column("Input", "I", array=inputs),
        fits.Column("Antenna", "I", array=[t.antenna for t in rows_tile]),
        fits.Column("Tile", "I", array=[t.tile_id for t in rows_tile]),
        fits.Column("TileName", "8A", array=[t.tile_name for t in rows_tile]),
        fits.Column("Pol", "A", array=pols),
        fits.Column("Rx", "I", array=[t.rx for t in rows_tile]),
        fits.Column("Slot", "I", array=[t.slot for t in rows_tile]),
        fits.Column("Flag", "I", array=[int(t.antenna in flagged) for t in rows_tile]),
        fits.Column("Length", "14A", array=[t.cable_length_label for t in rows_tile]),
        fits.Column("North", "E", unit="m", array=[t.north_m for t in rows_tile]),
        fits.Column("East", "E", unit="m", array=[t.east_m for t in rows_tile]),
        fits.Column("Height", "E", unit="m", array=[t.height_m for t in rows_tile]),
        # Digital gains x 64, one per coarse channel in CHANNELS order, zero-padded to 24.
        fits.Column("Gains", "24I", array=_gains_column(truth, rows_tile, list(pols))),
        fits.Column("BFTemps", "E", unit="degC", array=np.zeros(n_rows, dtype=np.float32)),
        fits.Column("Delays", "16I", array=delays[[t.antenna for t in rows_tile]].astype(np.int16)),
        fits.Column("VCSOrder", "I", array=[instrument.vcs_order(int(i)) for i in inputs]),
        fits.Column("Flavors", "10A", array=[t.flavor for t in rows_tile]),
        fits.Column("Calib_Delay", "E", unit="m", array=np.zeros(n_rows, dtype=np.float32)),
        fits.Column("Calib_Gains", "24E", array=np.ones((n_rows, 24), dtype=np.float32)),
    ]
    table = fits.BinTableHDU.from_columns(columns, name="TILEDATA")
    with warnings.catch_warnings():
        # As in the MWA's own metafits, a long CHANSEL keeps only the start of its comment
        # ("/ Indi" for 24 channels): astropy warns of it at each write, in the server's log.
        warnings.filterwarnings("ignore", "Card is too long, comment will be truncated")
        fits.HDUList([primary, table]).writeto(path, overwrite=True)


def _gpubox_primary_header(
    truth: SimulationTruth, coarse_index: int, unix_ms: int, marker: int, project_id: str
) -> bytes:
    n_fine = COARSE_CHAN_WIDTH_HZ // truth.fine_chan_width_hz
    cards: list[tuple[str, Any, str]] = [
        ("BITPIX", 8, "array data type"),
        ("NAXIS", 0, "number of array dimensions"),
        ("EXTEND", True, ""),
        ("CORR_VER", 2, "MWA Correlator Version"),
        ("U2S_VER", _U2S_VER, "MWAX u2s version"),
        ("CBF_VER", _CBF_VER, "MWAX db2correlate2db version"),
        ("DB2F_VER", _DB2F_VER, "MWAX db2fits version"),
        ("COMMENT", "Visibilities: 1 integration per HDU: [baseline][finechan][pol][r,i]", ""),
        ("COMMENT", "Weights: 1 integration per HDU: [baseline][pol][weight]", ""),
        ("MARKER", marker, "Data offset marker (all channels should match)"),
        ("TIME", unix_ms // 1000, "Unix time (seconds)"),
        ("MILLITIM", unix_ms % 1000, "Milliseconds since TIME"),
        ("PROJID", project_id, "MWA Project Id"),
        ("OBSID", truth.obsid, "MWA Observation Id"),
        ("FINECHAN", truth.fine_chan_width_hz / 1000.0, "[kHz] Fine channel width"),
        ("NFINECHS", n_fine, "Number of fine channels in this coarse channel"),
        ("INTTIME", truth.int_time_s, "Integration time (s)"),
        ("NINPUTS", 2 * truth.n_tiles, "Number of rf inputs into the correlator"),
        ("CORRHOST", f"mwax{coarse_index + 1:02d}", "Correlator host"),
        ("CORRCHAN", coarse_index, "Correlator coarse channel (0 to N-1)"),
        ("MC_IP", "0.0.0.0", "Multicast IP"),
        ("MC_PORT", 0, "Multicast Port"),
        ("HISTORY", "Simulated by observatory.telescope.simulator", ""),
    ]
    return _fits_header_bytes(cards, primary=True)


def _image_header(naxis1: int, naxis2: int, unix_ms: int, marker: int) -> bytes:
    cards: list[tuple[str, Any, str]] = [
        ("XTENSION", "IMAGE", "IMAGE extension"),
        ("BITPIX", -32, "number of bits per data pixel"),
        ("NAXIS", 2, "number of data axes"),
        ("NAXIS1", naxis1, "length of data axis 1"),
        ("NAXIS2", naxis2, "length of data axis 2"),
        ("PCOUNT", 0, "required keyword; must = 0"),
        ("GCOUNT", 1, "required keyword; must = 1"),
        ("TIME", unix_ms // 1000, "Unix time (seconds)"),
        ("MILLITIM", unix_ms % 1000, "Milliseconds since TIME"),
        ("MARKER", marker, "Data offset marker (all channels should match)"),
    ]
    return _fits_header_bytes(cards, primary=False)


def _batches(
    n_timesteps: int, int_time_ms: int, hdu_pair_bytes: int, file_size_limit_bytes: int
) -> list[range]:
    """Split integrations into files the way mwax_db2fits does.

    db2fits checks the size of the open file at the start of each 8 s
    sub-observation and starts the next file (batch) once it has reached the limit.
    """
    per_subobs = instrument.MWAX_SUBOBS_S * 1000 // int_time_ms
    batches: list[range] = []
    start = 0
    size = 0
    for t in range(n_timesteps):
        if t % per_subobs == 0 and t > start and size >= file_size_limit_bytes:
            batches.append(range(start, t))
            start, size = t, 0
        size += hdu_pair_bytes
    batches.append(range(start, n_timesteps))
    return batches


def _write_vis_file(
    path: Path,
    engine: _VisibilityEngine,
    coarse_chan: int,
    timesteps: range,
    unix_start_ms: int,
    int_time_ms: int,
    project_id: str,
    cancelled: Callable[[], bool] = _never,
) -> None:
    truth = engine.truth
    coarse_index = truth._coarse_index(coarse_chan)
    n_bl, n_fine = engine.n_baselines, engine.n_fine
    weights = engine.weights().astype(">f4")
    weights_bytes = weights.tobytes() + _pad_bytes(weights.nbytes)
    vis_pad = _pad_bytes(n_bl * n_fine * 8 * 4)

    def write_hdu_pair(handle: BinaryIO, vis: NDArray[np.complex64], t: int) -> None:
        unix_ms = unix_start_ms + t * int_time_ms
        handle.write(_image_header(n_fine * 8, n_bl, unix_ms, t))
        handle.write(vis.view(np.uint8).data)  # the array's bytes, without a copy
        handle.write(vis_pad)
        handle.write(_image_header(4, n_bl, unix_ms, t))
        handle.write(weights_bytes)

    # One writer thread overlaps the disk with computing the next integration.
    with open(path, "wb") as handle, ThreadPoolExecutor(max_workers=1) as io_thread:
        first_ms = unix_start_ms + timesteps.start * int_time_ms
        handle.write(
            _gpubox_primary_header(truth, coarse_index, first_ms, timesteps.start, project_id)
        )
        pending: Future[None] | None = None
        for t in timesteps:
            # Between integrations: a file of many integrations takes tens of seconds,
            # longer than a server being stopped can wait.
            _stop_if(cancelled)
            vis = engine.visibilities(t, coarse_chan, include_cable=truth.cable_delays_in_data)
            # FITS is big-endian; swapping in place avoids another copy of the biggest array.
            vis.view(np.uint32).byteswap(inplace=True)
            if pending is not None:
                pending.result()
            pending = io_thread.submit(write_hdu_pair, handle, vis, t)
        if pending is not None:
            pending.result()


def _subfile_header(
    truth: SimulationTruth,
    subobs_gps: int,
    coarse_chan: int,
    unix_start_s: int,
    utc_start: str,
    exposure_s: int,
    project_id: str,
    block_bytes: int,
) -> bytes:
    n_inputs = 2 * truth.n_tiles
    int_time_ms = round(truth.int_time_s * 1000)
    lines = [
        f"HDR_SIZE {VCS_SUBFILE_HEADER_BYTES}",
        "POPULATED 1",
        f"OBS_ID {truth.obsid}",
        f"SUBOBS_ID {subobs_gps}",
        f"MODE {truth.mode}",
        f"UTC_START {utc_start}",
        f"OBS_OFFSET {subobs_gps - truth.obsid}",
        "NBIT 8",
        "NPOL 2",
        f"NTIMESAMPLES {VCS_SAMPLES_PER_BLOCK}",
        f"NINPUTS {n_inputs}",
        f"NINPUTS_XGPU {(n_inputs + 31) // 32 * 32}",
        "APPLY_PATH_WEIGHTS 0",
        "APPLY_PATH_DELAYS 0",
        "APPLY_PATH_PHASE_OFFSETS 0",
        f"INT_TIME_MSEC {int_time_ms}",
        "APPLY_COARSE_DERIPPLE 0",
        f"FSCRUNCH_FACTOR {truth.fine_chan_width_hz // ULTRAFINE_CHAN_WIDTH_HZ}",
        "APPLY_VIS_WEIGHTS 0",
        f"TRANSFER_SIZE {block_bytes * VCS_BLOCKS_PER_SUBOBS}",
        f"PROJ_ID {project_id}",
        f"EXPOSURE_SECS {exposure_s}",
        f"COARSE_CHANNEL {coarse_chan}",
        f"CORR_COARSE_CHANNEL {truth._coarse_index(coarse_chan) + 1}",
        f"SECS_PER_SUBOBS {instrument.MWAX_SUBOBS_S}",
        f"UNIXTIME {unix_start_s}",
        "UNIXTIME_MSEC 0",
        f"FINE_CHAN_WIDTH_HZ {truth.fine_chan_width_hz}",
        f"NFINE_CHAN {COARSE_CHAN_WIDTH_HZ // truth.fine_chan_width_hz}",
        f"BANDWIDTH_HZ {COARSE_CHAN_WIDTH_HZ}",
        f"SAMPLE_RATE {COARSE_CHAN_WIDTH_HZ}",
        "NCOHERENT_BEAMS 0",
        "MC_IP 0.0.0.0",
        "MC_PORT 0",
        "MC_SRC_IP 0.0.0.0",
        f"MWAX_U2S_VER {_U2S_VER}",
    ]
    text = ("\n".join(lines) + "\n").encode("ascii")
    return text.ljust(VCS_SUBFILE_HEADER_BYTES, b"\0")


def _write_subfile(
    path: Path,
    truth: SimulationTruth,
    subobs_index: int,
    coarse_chan: int,
    header: bytes,
    cancelled: Callable[[], bool] = _never,
) -> None:
    """Header, a zero delay block, then 160 blocks of [input][sample][re, im] int8 noise.

    Inputs are in mwalib's ``subfile_order`` (antenna-major, X then Y). Stops between
    blocks (raising :class:`SimulationCancelled`) once ``cancelled()`` says so.
    """
    n_inputs = 2 * truth.n_tiles
    block_bytes = n_inputs * VCS_SAMPLES_PER_BLOCK * 2
    seed = np.random.SeedSequence(truth.seed, spawn_key=(2, coarse_chan, subobs_index))
    rng = np.random.Generator(np.random.SFC64(seed))
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(b"\0" * block_bytes)  # delay table: no delays applied
        for _ in range(VCS_BLOCKS_PER_SUBOBS):
            _stop_if(cancelled)  # a sub-file of many tiles is gigabytes
            samples = _gaussian_noise(rng, block_bytes)
            samples *= np.float32(truth.vcs_rms_counts)
            np.rint(samples, out=samples)
            np.clip(samples, -127, 127, out=samples)
            handle.write(samples.astype(np.int8).tobytes())


# ----------------------------------------------------------------------------------------------
# Parameter checking


def _as_sources(sources: Sequence[PointSource | Sequence[float]]) -> tuple[PointSource, ...]:
    result = []
    for item in sources:
        if isinstance(item, PointSource):
            source = item
        else:
            try:
                source = PointSource(*item)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(
                    f"sources entry {item!r} is not a PointSource or "
                    "(ra_deg, dec_deg, flux_jy_150mhz[, spectral_index])"
                ) from None
        values = (source.ra_deg, source.dec_deg, source.flux_jy_150mhz, source.spectral_index)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"sources entry {item!r} has a non-finite or non-numeric value")
        if not -90.0 <= source.dec_deg <= 90.0:
            raise ValueError(f"sources entry {item!r}: dec_deg {source.dec_deg} is outside -90..90")
        if source.flux_jy_150mhz < 0:
            raise ValueError(f"sources entry {item!r}: flux_jy_150mhz is negative")
        result.append(source)
    return tuple(result)


def _broadcast(
    name: str, value: ArrayLike | None, shape: tuple[int, ...], default: float
) -> NDArray:
    if value is None:
        return np.full(shape, default, dtype=np.float64)
    try:
        array = np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()
    except (ValueError, TypeError):
        raise ValueError(
            f"{name} has shape {np.shape(value)}; it must broadcast to {shape}"
        ) from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    return array


def _check_number(name: str, value: float, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} {value!r} is not a number")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} {value!r} must be a finite number >= {minimum}")
    return float(value)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} {value!r} must be an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# The entry point


def _gains_column(
    truth: SimulationTruth, rows_tile: Sequence[Tile], pols: Sequence[str]
) -> NDArray[np.int16]:
    """The metafits ``Gains`` column: per input, digital gain x 64 per coarse channel."""
    column = np.zeros((len(rows_tile), 24), dtype=np.int16)
    n_coarse = len(truth.coarse_chans)
    if truth.digital_gains is None:
        column[:, :n_coarse] = 64
        return column
    for row, (tile, pol) in enumerate(zip(rows_tile, pols, strict=True)):
        antenna = next(i for i, t in enumerate(truth.tiles) if t.antenna == tile.antenna)
        column[row, :n_coarse] = np.rint(64 * truth.digital_gains[antenna, "XY".index(pol)])
    return column


def simulate_observation(
    out_dir: str | os.PathLike[str],
    obsid: int,
    *,
    n_tiles: int | None = 8,
    tile_ids: Sequence[int] | None = None,
    coarse_chans: Sequence[int] = (137,),
    fine_chan_khz: float = 40.0,
    int_time_s: float = 2.0,
    n_timesteps: int = 2,
    sources: Sequence[PointSource | Sequence[float]] = (),
    pointing_radec_deg: tuple[float, float] | None = None,
    phase_centre_radec_deg: tuple[float, float] | None = None,
    mode: str = "MWAX_CORRELATOR",
    gain_amplitudes: ArrayLike | None = None,
    delay_errors_ns: ArrayLike | None = None,
    gain_amplitude_scatter: float = 0.0,
    delay_error_scatter_ns: float = 0.0,
    flagged_antennas: Sequence[int] = (),
    noise_sigma_jy: float = 0.0,
    seed: int = 0,
    include_cable_delays: bool = True,
    project_id: str = "G0000",
    obs_name: str | None = None,
    creator: str = "simulator",
    calibrator: str | None = None,
    file_size_limit_bytes: int = DEFAULT_FILE_SIZE_LIMIT_BYTES,
    digital_gain_scatter: float = 0.0,
    quack_time_s: float = 0.0,
    rfi: Sequence[RfiBurst] = (),
    voltage_subobs_gps: Collection[int] | None = None,
    beamformer_delays: ArrayLike | None = None,
    header_delays: Sequence[int] | None = None,
    atten_db: float = 1.0,
    pointing_grid: tuple[str, int] = ("sim", 0),
    cancel: CancelRequest | None = None,
) -> SimulatedObservation:
    """Write a simulated MWA observation (metafits, data files and truth JSON).

    Parameters
    ----------
    out_dir
        Directory to write into (created if missing).
    obsid
        Observation id = GPS start second (10 digits).
    n_tiles, tile_ids
        The array: the first ``n_tiles`` tiles of the real 128-tile layout, or the
        tiles with these ids (then ``n_tiles`` is ignored).
    coarse_chans
        Receiver channel numbers (1..255, at most 24). pyuvdata assumes they are
        contiguous when it assigns frequencies; mwalib does not.
    fine_chan_khz
        MWAX fine channel width in kHz (a multiple of 0.2 kHz dividing 1280 kHz).
    int_time_s
        Integration time (0.25, 0.5, 1, 2, 4 or 8 s).
    n_timesteps
        Integrations (correlator) or 8 s sub-files per coarse channel (VCS).
    sources
        Point sources: :class:`PointSource` or tuples
        ``(ra_deg, dec_deg, flux_jy_150mhz[, spectral_index])``.
    pointing_radec_deg
        Pointing centre (RA, Dec) in degrees; default the first source, or
        zenith at the midpoint when there are no sources. Alt/az, LST, HA and
        the beamformer delays are derived at the midpoint.
    phase_centre_radec_deg
        The desired phase centre (metafits ``RAPHASE``/``DECPHASE``) in degrees; default the
        pointing centre. A triggered observation is pointed at a beamformer sweet spot near
        its target and phased to the target itself.
    mode
        ``'MWAX_CORRELATOR'`` (visibility FITS) or ``'MWAX_VCS'`` (``.sub`` files).
        VCS voltages are seeded Gaussian noise (rms :data:`VCS_RMS_COUNTS` counts):
        sources and gains go into the truth file but not into the voltages.
    gain_amplitudes
        Amplitudes broadcastable to (n_tiles, 2, n_coarse) [antenna, pol X/Y,
        coarse channel]; default 1.
    delay_errors_ns
        Delay errors broadcastable to (n_tiles, 2), in ns; default 0.
    gain_amplitude_scatter, delay_error_scatter_ns
        Add seeded random scatter: amplitudes x |1 + N(0, scatter)|, delays + N(0, scatter).
    flagged_antennas
        Antenna indices (0..n_tiles-1) to flag: ``Flag=1`` in TILEDATA. As real flagged
        tiles often are, they are dead: their data hold noise (and its power in the
        autocorrelations) but no sky; their weights are 1, as in real files.
    noise_sigma_jy
        Standard deviation of the Gaussian noise of each real and imaginary part of a
        baseline of tiles of unit gain, before the tiles' gains (which scale it as they scale
        the sky); the autocorrelations hold its power (:attr:`SimulationTruth.system_sefd_jy`).
    seed
        Seed of all random numbers (noise, scatter, voltages).
    include_cable_delays
        Put the metafits cable-length phases into the raw data (as real data have them).
    project_id, obs_name, creator
        metafits ``PROJECT``, ``FILENAME`` and ``CREATOR``.
    calibrator
        Name of the calibrator this observation is of (metafits ``CALIBRAT``/``CALIBSRC``); None for a target.
    beamformer_delays
        The 16 dipole delays the tiles were set to (metafits ``DELAYS``): a scheduled
        observation's own, such as a sweet-spot pointing's or all-sky's; or 16 per tile
        (n_tiles x 16, in antenna order) when subarrays point apart (TILEDATA ``Delays``;
        ``DELAYS`` then holds the first tile's, or ``header_delays``); default those
        pointing the tiles at ``pointing_radec_deg`` at the midpoint.
    header_delays
        The metafits ``DELAYS`` when the tiles point apart: those of the pointing the header
        names (RA/DEC, AZIMUTH/ALTITUDE), such as the first subarray's; default the first
        tile's.
    atten_db
        The global analogue attenuation (metafits ``ATTEN_DB``).
    pointing_grid
        The grid point the delays are (metafits ``GRIDNAME``, ``GRIDNUM``), such as
        ``("sweet", 21)``; by default ``("sim", 0)``, none.
    voltage_subobs_gps
        VCS only: write only the 8 s sub-files starting at these GPS seconds (each on the
        observation's 8 s grid), as buffer dumps save only parts of a buffering
        observation (default: all).
    file_size_limit_bytes
        Start a new batch file at the next 8 s boundary once a file reaches this size.
    cancel
        Stop early once this event is set (or this callable returns True): checked between
        integrations and files. Default: the request of an enclosing :func:`cancelled_by`,
        if any.

    Returns
    -------
    SimulatedObservation
        Paths of every written file (kind, coarse channel, batch) and the truth.

    Raises
    ------
    ValueError
        Naming the parameter, for any invalid parameter. Nothing is written then.
    SimulationCancelled
        When ``cancel`` asked to stop before the simulation finished. Everything it
        wrote (finished and partial files) has been removed.
    """
    cancelled = _cancel_check(cancel if cancel is not None else _CANCEL.get())
    # --- check everything before writing anything
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    obsid = _check_int("obsid", obsid, MIN_OBSID)
    if obsid >= 10**10:
        raise ValueError(f"obsid {obsid} has more than 10 digits")
    tiles = instrument.array_tiles(
        n_tiles=None if tile_ids is not None else n_tiles, tile_ids=tile_ids
    )
    chans = instrument.validate_coarse_chans(coarse_chans)
    try:
        fine_chan_width_hz = instrument.validate_fine_chan_width_hz(
            _check_number("fine_chan_khz", fine_chan_khz) * 1000.0
        )
    except ValueError as error:
        raise ValueError(f"fine_chan_khz {fine_chan_khz!r}: {error}") from None
    try:
        int_time_ms = instrument.validate_int_time_ms(
            _check_number("int_time_s", int_time_s) * 1000.0
        )
    except ValueError as error:
        raise ValueError(f"int_time_s {int_time_s!r}: {error}") from None
    n_timesteps = _check_int("n_timesteps", n_timesteps, 1)
    the_sources = _as_sources(sources)
    noise_sigma_jy = _check_number("noise_sigma_jy", noise_sigma_jy)
    gain_amplitude_scatter = _check_number("gain_amplitude_scatter", gain_amplitude_scatter)
    delay_error_scatter_ns = _check_number("delay_error_scatter_ns", delay_error_scatter_ns)
    seed = _check_int("seed", seed, 0)
    file_size_limit_bytes = _check_int("file_size_limit_bytes", file_size_limit_bytes, 1)
    n_ant, n_coarse = len(tiles), len(chans)
    amplitudes = _broadcast("gain_amplitudes", gain_amplitudes, (n_ant, 2, n_coarse), 1.0)
    if np.any(amplitudes < 0):
        raise ValueError("gain_amplitudes has negative values")
    delays_ns = _broadcast("delay_errors_ns", delay_errors_ns, (n_ant, 2), 0.0)
    try:
        requested = list(flagged_antennas)
        flagged = sorted({int(a) for a in requested if not isinstance(a, bool)})
        well_formed = len(flagged) == len(requested)
    except (TypeError, ValueError):
        flagged, well_formed = [], False
    if not well_formed or any(not 0 <= a < n_ant for a in flagged):
        raise ValueError(
            f"flagged_antennas {flagged_antennas!r} must be distinct indices in 0..{n_ant - 1}"
        )
    for label, text in (("project_id", project_id), ("obs_name", obs_name)):
        if text is None:
            continue
        if not isinstance(text, str) or not text:
            raise ValueError(f"{label} {text!r} must be a non-empty string")
        problem = instrument.metafits_text_problem(text)
        if problem:
            raise ValueError(f"{label} {problem}")

    timestep_s = instrument.MWAX_SUBOBS_S if mode == "MWAX_VCS" else int_time_ms / 1000.0
    duration_s = n_timesteps * timestep_s
    exposure_s = math.ceil(duration_s)
    if pointing_radec_deg is None:
        if the_sources:
            pointing_radec_deg = (the_sources[0].ra_deg, the_sources[0].dec_deg)
        else:
            pointing_radec_deg = _zenith_radec_deg(obsid + duration_s / 2.0)  # as the metafits
    try:
        ra_deg, dec_deg = (float(v) for v in pointing_radec_deg)
    except (TypeError, ValueError):
        raise ValueError(
            f"pointing_radec_deg {pointing_radec_deg!r} is not (ra_deg, dec_deg)"
        ) from None
    if not (math.isfinite(ra_deg) and -90.0 <= dec_deg <= 90.0):
        raise ValueError(f"pointing_radec_deg {pointing_radec_deg!r} is not a valid (ra, dec)")
    ra_deg %= 360.0
    epoch = _epoch(obsid, duration_s, ra_deg, dec_deg)
    if beamformer_delays is not None:
        try:
            given = np.asarray(beamformer_delays, dtype=np.int64)
            beam_delays = np.broadcast_to(given, (n_ant, 16))
        except (TypeError, ValueError):
            given, beam_delays = np.zeros(0, np.int64), np.full((n_ant, 16), -1)
        if given.ndim not in (1, 2) or np.any((beam_delays < 0) | (beam_delays > 32)):
            raise ValueError(
                f"beamformer_delays {beamformer_delays!r} must be 16 values in 0..32, "
                f"or 16 for each of the {n_ant} tiles"
            )
    else:
        try:
            pointed = instrument.beamformer_delays(epoch.az_deg, epoch.alt_deg)
        except ValueError as error:
            raise ValueError(f"pointing_radec_deg {pointing_radec_deg!r}: {error}") from None
        beam_delays = np.broadcast_to(np.asarray(pointed, dtype=np.int64), (n_ant, 16))
    pointing_delays = beam_delays[0]
    if header_delays is not None:
        pointing_delays = np.asarray(header_delays, dtype=np.int64)
        if pointing_delays.shape != (16,) or np.any((pointing_delays < 0) | (pointing_delays > 32)):
            raise ValueError(f"header_delays {header_delays!r} must be 16 values in 0..32")
    atten_db = _check_number("atten_db", atten_db)

    if gain_amplitude_scatter > 0 or delay_error_scatter_ns > 0:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        amplitudes = amplitudes * np.abs(
            1.0 + gain_amplitude_scatter * rng.standard_normal(amplitudes.shape)
        )
        delays_ns = delays_ns + delay_error_scatter_ns * rng.standard_normal(delays_ns.shape)

    truth = SimulationTruth(
        obsid=obsid,
        mode=mode,
        int_time_s=int_time_ms / 1000.0,
        n_timesteps=n_timesteps,
        coarse_chans=chans,
        fine_chan_width_hz=fine_chan_width_hz,
        tiles=tiles,
        pointing_ra_deg=ra_deg,
        pointing_dec_deg=dec_deg,
        pointing_az_deg=epoch.az_deg,
        pointing_alt_deg=epoch.alt_deg,
        sources=the_sources,
        gain_amplitudes=amplitudes,
        delay_errors_ns=delays_ns,
        flagged_antennas=tuple(flagged),
        noise_sigma_jy=noise_sigma_jy,
        seed=seed,
        cable_delays_in_data=bool(include_cable_delays),
        digital_gains=_digital_gains(seed, digital_gain_scatter, (n_ant, 2, n_coarse)),
        quack_time_s=_check_number("quack_time_s", quack_time_s),
        rfi=_checked_rfi(rfi, chans, fine_chan_width_hz, n_timesteps),
    )
    if voltage_subobs_gps is not None:
        grid = range(
            obsid, obsid + n_timesteps * instrument.MWAX_SUBOBS_S, instrument.MWAX_SUBOBS_S
        )
        if mode != "MWAX_VCS" or not set(voltage_subobs_gps) <= set(grid):
            raise ValueError(
                f"voltage_subobs_gps {sorted(voltage_subobs_gps)!r} must be sub-file starts of "
                "the observation (obsid + 8 s steps), and only with mode 'MWAX_VCS'"
            )
    name = obs_name if obs_name is not None else f"sim_{obsid}"

    # --- write
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out_path)
    try:
        _stop_if(cancelled)
        metafits_name = f"{obsid}.metafits"
        with writer.atomic(metafits_name) as temp:
            _write_metafits(
                temp, truth, epoch, beam_delays, pointing_delays, exposure_s, project_id, name,
                calibrator or "",
                phase_centre_radec_deg or (ra_deg, dec_deg), creator, atten_db, pointing_grid,
            )  # fmt: skip
        writer.record(metafits_name, "metafits")

        if mode == "MWAX_CORRELATOR":
            _write_correlator_files(
                writer, truth, epoch, int_time_ms, project_id, file_size_limit_bytes, cancelled
            )
        else:
            _write_voltage_files(
                writer, truth, epoch, exposure_s, project_id, voltage_subobs_gps, cancelled
            )
        _stop_if(cancelled)

        truth_name = f"{obsid}_truth.json"
        with writer.atomic(truth_name) as temp:
            temp.write_text(json.dumps(truth.to_json_dict(), indent=1) + "\n", encoding="utf-8")
        writer.record(truth_name, "truth")
    except SimulationCancelled:
        writer.remove_all()
        raise SimulationCancelled(
            f"simulation of observation {obsid} cancelled: its files were removed"
        ) from None
    except BaseException:
        writer.remove_all()
        raise
    return SimulatedObservation(
        obsid=obsid, out_dir=out_path, mode=mode, files=writer.files(), truth=truth
    )


def _digital_gains(
    seed: int, scatter: float, shape: tuple[int, int, int]
) -> NDArray[np.float64] | None:
    """Seeded digital gains around 1, in the metafits' steps of 1/64; None for unity.

    ``shape`` is (antennas, polarisations, coarse channels); a tile's two polarisations
    get the same gain, as in every real metafits (the receiver sets one per tile and
    coarse channel), which pyuvdata relies on: it divides both by the X row's gains.
    """
    scatter = _check_number("digital_gain_scatter", scatter)
    if scatter == 0.0:
        return None
    n_ant, n_pols, n_coarse = shape
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    per_tile = np.rint(64 * np.abs(1.0 + scatter * rng.standard_normal((n_ant, 1, n_coarse)))) / 64
    return np.repeat(np.maximum(per_tile, 1 / 64), n_pols, axis=1)


def _checked_rfi(
    bursts: Sequence[RfiBurst], chans: Sequence[int], fine_chan_width_hz: int, n_timesteps: int
) -> tuple[RfiBurst, ...]:
    n_fine = COARSE_CHAN_WIDTH_HZ // fine_chan_width_hz
    for burst in bursts:
        start_chan, stop_chan = burst.fine_chans
        start_t, stop_t = burst.timesteps
        if (
            burst.coarse_chan not in chans
            or not 0 <= start_chan < stop_chan <= n_fine
            or not 0 <= start_t < stop_t <= n_timesteps
            or not math.isfinite(burst.amplitude_jy)
        ):
            raise ValueError(
                f"rfi burst {burst!r} must lie in the simulated coarse channels {list(chans)}, "
                f"fine channels 0..{n_fine}, integrations 0..{n_timesteps}"
            )
    return tuple(bursts)


def _zenith_radec_deg(gps_s: float) -> tuple[float, float]:
    """ICRS (RA, Dec) of the zenith at the MWA at ``gps_s``."""
    ensure_astropy_offline()
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    location = mwa_location()
    time = Time(gps_s, format="gps")
    zenith = SkyCoord(az=0 * u.deg, alt=90 * u.deg, frame=AltAz(obstime=time, location=location))
    icrs = zenith.icrs
    return float(icrs.ra.deg), float(icrs.dec.deg)


def _write_correlator_files(
    writer: _Writer,
    truth: SimulationTruth,
    epoch: _Epoch,
    int_time_ms: int,
    project_id: str,
    file_size_limit_bytes: int,
    cancelled: Callable[[], bool] = _never,
) -> None:
    engine = _VisibilityEngine(truth)
    n_bl, n_fine = engine.n_baselines, engine.n_fine
    vis_bytes = n_bl * n_fine * 8 * 4
    weight_bytes = n_bl * 4 * 4
    hdu_pair_bytes = 2 * _FITS_BLOCK_BYTES + vis_bytes + _pad_bytes_len(vis_bytes)
    hdu_pair_bytes += weight_bytes + _pad_bytes_len(weight_bytes)
    batches = _batches(truth.n_timesteps, int_time_ms, hdu_pair_bytes, file_size_limit_bytes)
    stamp = epoch.date_obs.replace("-", "").replace("T", "").replace(":", "")
    unix_start_ms = epoch.unix_start_s * 1000

    def write_one(batch_number: int, timesteps: range, coarse_chan: int) -> None:
        file_name = f"{truth.obsid}_{stamp}_ch{coarse_chan:03d}_{batch_number:03d}.fits"
        _stop_if(cancelled)
        with writer.atomic(file_name) as temp:
            _write_vis_file(
                temp,
                engine,
                coarse_chan,
                timesteps,
                unix_start_ms,
                int_time_ms,
                project_id,
                cancelled,
            )
        writer.record(file_name, "mwax_vis", coarse_chan=coarse_chan, batch=batch_number)

    jobs = [
        (batch_number, timesteps, coarse_chan)
        for batch_number, timesteps in enumerate(batches)
        for coarse_chan in truth.coarse_chans
    ]
    # Files are independent and numpy releases the GIL: one thread per file in flight
    # uses the cores (like MWAX's one host per coarse channel). Capped to bound memory.
    workers = max(1, min(len(jobs), os.cpu_count() or 1, MAX_WRITER_THREADS))
    if workers == 1:
        for job in jobs:
            write_one(*job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(write_one, *job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # Start nothing new; leaving the block waits for the running files to finish.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _pad_bytes_len(n_bytes: int) -> int:
    return -n_bytes % _FITS_BLOCK_BYTES


def _write_voltage_files(
    writer: _Writer,
    truth: SimulationTruth,
    epoch: _Epoch,
    exposure_s: int,
    project_id: str,
    wanted_gps: Collection[int] | None = None,
    cancelled: Callable[[], bool] = _never,
) -> None:
    block_bytes = 2 * truth.n_tiles * VCS_SAMPLES_PER_BLOCK * 2
    utc_start = epoch.date_obs.replace("T", "-")
    for subobs_index in range(truth.n_timesteps):
        subobs_gps = truth.obsid + subobs_index * instrument.MWAX_SUBOBS_S
        if wanted_gps is not None and subobs_gps not in wanted_gps:
            continue
        for coarse_chan in truth.coarse_chans:
            header = _subfile_header(
                truth,
                subobs_gps,
                coarse_chan,
                epoch.unix_start_s,
                utc_start,
                exposure_s,
                project_id,
                block_bytes,
            )
            file_name = f"{truth.obsid}_{subobs_gps}_{coarse_chan}.sub"
            with writer.atomic(file_name) as temp:
                _write_subfile(temp, truth, subobs_index, coarse_chan, header, cancelled)
            writer.record(file_name, "voltage", coarse_chan=coarse_chan, gps_time_s=subobs_gps)
