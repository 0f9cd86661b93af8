"""The numerical steps of a conversion, vectorised over times, baselines and channels.

Every function works on arrays in the reader's chunk layout (see
:mod:`observatory.preprocess.reader`): visibilities ``(n_times, n_baselines,
n_chans, 4)`` with pols XX, XY, YX, YY, in pyuvdata's convention.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from numpy.typing import NDArray

from observatory.preprocess.options import is_multiple
from observatory.preprocess.reader import ObservationMeta, ReadError
from observatory.telescope.instrument import SPEED_OF_LIGHT_M_S

#: For each output pol (XX, XY, YX, YY): the pol (0 = X, 1 = Y) of antenna p and of antenna q.
POL_OF_P = np.array([0, 0, 1, 1])
POL_OF_Q = np.array([0, 1, 0, 1])


def cable_phasors(meta: ObservationMeta, freqs_hz: NDArray[np.float64]) -> NDArray[np.complex64]:
    """Factors that remove the electrical cable lengths, shape (n_baselines, n_chans, 4).

    Raw data carry ``exp(-2 pi i f (L_p - L_q) / c)`` per polarisation pair; in
    pyuvdata's (conjugated) convention that is ``exp(+2 pi i f (L_p - L_q) / c)``,
    which ``e_p conj(e_q)`` with ``e = exp(-2 pi i f L / c)`` cancels.
    """
    phase = (-2.0 * np.pi / SPEED_OF_LIGHT_M_S) * meta.cable_length_m[:, :, None] * freqs_hz
    per_input = np.exp(1j * phase).astype(np.complex64)  # (n_ants, 2 pols, n_chans)
    return baseline_products(meta, per_input)


def baseline_products(
    meta: ObservationMeta, per_input: NDArray[np.complex64]
) -> NDArray[np.complex64]:
    """``a_p conj(a_q)`` for every baseline and pol pair, shape (n_baselines, n_chans, 4).

    ``per_input`` is indexed (antenna, pol X/Y, channel). Forming baseline factors
    from per-antenna ones costs one complex multiply per sample instead of an
    exponential.
    """
    p, q = meta.baseline_antennas()
    left = per_input[p][:, POL_OF_P]  # (n_bl, 4, n_chans)
    right = per_input[q][:, POL_OF_Q]
    return np.ascontiguousarray((left * np.conj(right)).transpose(0, 2, 1))


def digital_gain_factors(meta: ObservationMeta, coarse_chan: int) -> NDArray[np.float32]:
    """Factors dividing out the receivers' digital gains, shape (n_baselines, 1, 4)."""
    try:
        column = meta.metafits_coarse_chans.index(coarse_chan)
    except ValueError:
        raise ValueError(f"coarse channel {coarse_chan} is not in the metafits") from None
    gains = meta.digital_gains[:, :, column]  # (n_ants, 2)
    p, q = meta.baseline_antennas()
    product = gains[p][:, POL_OF_P] * gains[q][:, POL_OF_Q]
    with np.errstate(divide="ignore"):
        factors = np.where(product > 0, 1.0 / product, 0.0)
    return factors[:, None, :].astype(np.float32)


def baselines_without_digital_gain(meta: ObservationMeta, coarse_chan: int) -> NDArray[np.bool_]:
    """Baselines with an input whose digital gain is 0 in ``coarse_chan``, shape (n_baselines,):
    their samples are zeros nothing can be divided out of (flagged, never data of weight 1)."""
    return np.asarray((digital_gain_factors(meta, coarse_chan)[:, 0, :] == 0).any(axis=-1))


@cache
def _passband_shape(name: str) -> NDArray[np.float64]:
    import h5py

    data = resources.files("pyuvdata") / "data" / "mwa_config_data" / f"{name}.h5"
    with resources.as_file(data) as path, h5py.File(path, "r") as handle:
        return np.asarray(handle["coarse_band"][:], dtype=np.float64)


def passband_gains(meta: ObservationMeta, chan_index: NDArray[np.intp]) -> NDArray[np.float64]:
    """The polyphase filterbank's response at each channel (1 at the coarse-channel centre).

    The shapes are the ones pyuvdata ships. Legacy: the correlator's at 10 kHz, averaged in
    blocks for wider channels (as pyuvdata does). MWAX: the 40 kHz and 80 kHz ones, as they
    are at those widths; for wider channels the 80 kHz (or 40 kHz) one averaged over each
    channel's band, which is centred on its channel (MWAX's middle channel sits on the
    coarse-channel centre, so blocks of the finer shape would be half a channel off: up to
    9 % at 80 kHz); for narrower ones the 40 kHz one interpolated.
    """
    n_chans = meta.fine_chans_per_coarse
    width_hz = meta.fine_chan_width_hz
    if not meta.mwax:
        shape = _passband_shape("MWA_rev_cb_10khz_doubles")
        if not is_multiple(width_hz, 10_000.0) or len(shape) % round(width_hz / 10_000.0):
            raise ValueError(f"no legacy passband for {width_hz / 1e3:g} kHz channels")
        gains = shape.reshape(-1, round(width_hz / 10_000.0)).mean(axis=1)
    else:
        shape_width_hz = 80_000.0 if is_multiple(width_hz, 80_000.0) else 40_000.0
        shape = _passband_shape(f"mwax_pfb_bandpass_{shape_width_hz / 1e3:.0f}kHz")
        gains = _centred_channels(shape, width_hz / shape_width_hz, n_chans)
    if len(gains) != n_chans:
        raise ValueError(f"passband of {len(gains)} channels for {n_chans} fine channels")
    return gains[chan_index]


def _centred_channels(
    shape: NDArray[np.float64], factor: float, n_chans: int
) -> NDArray[np.float64]:
    """``shape`` (a coarse channel's response, middle channel on its centre) seen by
    ``n_chans`` channels ``factor`` times as wide, also with the middle one on the centre.

    Wider: the mean of the shape over each channel's band (its channels as steps, the
    coarse channel's neighbours continuing it periodically at the edges). Narrower: the
    shape interpolated at each channel's centre.
    """
    if abs(factor - 1) < 1e-9:
        return shape.copy()
    n_shape = len(shape)
    centres = (np.arange(n_chans) - n_chans // 2) * factor + n_shape // 2
    if factor < 1:
        return np.interp(centres, np.arange(n_shape), shape)
    periodic = np.concatenate([shape, shape, shape])
    edges = (
        np.arange(3 * n_shape + 1) - 0.5 - n_shape
    )  # each step's lower edge, and the last's upper
    integral = np.concatenate([[0.0], np.cumsum(periodic)])
    upper = np.interp(centres + factor / 2, edges, integral)
    lower = np.interp(centres - factor / 2, edges, integral)
    return np.asarray((upper - lower) / factor, dtype=np.float64)


def instrument_factors(
    meta: ObservationMeta,
    coarse_chan: int,
    freqs_hz: NDArray[np.float64],
    chan_index: NDArray[np.intp],
    *,
    cable: bool,
    digital_gains: bool,
    passband: bool,
) -> NDArray[np.complex64] | None:
    """Cable, digital-gain and passband corrections as one factor, shape (n_baselines, n_chans, 4).

    Multiplying once by the product costs one pass over the data instead of three.
    None when no correction is asked for.
    """
    if not (cable or digital_gains or passband):
        return None
    n_chans = len(freqs_hz)
    factors = np.ones((meta.n_baselines, n_chans, 4), dtype=np.complex64)
    if cable:
        factors *= cable_phasors(meta, freqs_hz)
    if digital_gains:
        factors *= digital_gain_factors(meta, coarse_chan)
    if passband:
        factors *= (1.0 / passband_gains(meta, chan_index)).astype(np.float32)[None, :, None]
    return factors


def quack_timesteps(
    meta: ObservationMeta, time_start_gps_s: NDArray[np.float64]
) -> NDArray[np.bool_]:
    """Integrations that start before the end of the quack time (flagged), as Birli's: one
    that holds any of the settling time is flagged (times compared to the millisecond, on
    which MWA integrations start)."""
    good_from_s = meta.sched_start_gps_s + meta.quack_time_s
    return np.round(time_start_gps_s, 3) < np.round(good_from_s, 3)


def edge_and_dc_channels(
    chan_index: NDArray[np.intp], chans_per_coarse: int, edge_chans: int, flag_dc: bool
) -> NDArray[np.bool_]:
    """Channels flagged for the coarse-channel edges and, when asked, the DC channel."""
    flagged = (chan_index < edge_chans) | (chan_index >= chans_per_coarse - edge_chans)
    if flag_dc:
        flagged |= chan_index == chans_per_coarse // 2
    return flagged


def source_directions_enu(
    radec_deg: tuple[float, float], time_centres_gps_s: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Unit vectors (East, North, Up) towards an ICRS direction at each time, shape (n_times, 3).

    Apparent place at the MWA through astropy (precession, nutation, aberration;
    no refraction), the same geometry the simulator uses.
    """
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    from observatory.telescope.site import mwa_location

    location = mwa_location()
    times = Time(time_centres_gps_s, format="gps", location=location)
    sky = SkyCoord(ra=radec_deg[0] * u.deg, dec=radec_deg[1] * u.deg, frame="icrs")
    altaz = sky.transform_to(AltAz(obstime=times, location=location))
    alt = altaz.alt.to_value(u.rad)
    az = altaz.az.to_value(u.rad)
    return np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)


def correlator_directions_enu(
    meta: ObservationMeta, time_centres_gps_s: NDArray[np.float64]
) -> NDArray[np.float64] | None:
    """The direction (East, North, Up) the correlator phased the data to at each time, shape
    (n_times, 3); None when it applied no geometric delays (metafits GEODEL 0).

    Phasing such data to a direction ``s`` multiplies them by the factors of ``s`` minus
    this direction (:func:`geometric_phasors` is linear in the direction): the
    correlator's phasing is undone and the new one made in one step, and data already at
    ``s`` are left as they are. Birli skips its correction for such data; it would then
    leave them at the correlator's direction whatever phase centre was asked for.

    Raises
    ------
    ReadError
        For an ``AzElTracking`` observation whose metafits has no pointing RA and Dec, or
        a kind of phasing mwalib does not name.
    """
    n_times = len(time_centres_gps_s)
    applied = meta.geometric_delays_applied
    if applied == "No":
        return None
    if applied == "Zenith":
        return np.tile([0.0, 0.0, 1.0], (n_times, 1))
    if applied == "TilePointing":  # the tiles' delays: a fixed azimuth and elevation
        az, el = np.radians(meta.pointing_azel_deg)
        direction = [np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)]
        return np.tile(direction, (n_times, 1))
    if applied == "AzElTracking":
        if meta.pointing_radec_deg is None:
            raise ReadError("the correlator tracked the pointing (GEODEL), whose RA and Dec "
                            "the metafits does not give")  # fmt: skip
        return source_directions_enu(meta.pointing_radec_deg, time_centres_gps_s)
    raise ReadError(
        f"geometric delays applied by the correlator as {applied!r} (GEODEL): "
        "not a kind this converter knows"
    )


def geometric_phasors(
    meta: ObservationMeta,
    directions_enu: NDArray[np.float64],
    freqs_hz: NDArray[np.float64],
) -> NDArray[np.complex64]:
    """Factors that phase each baseline to a direction, shape (n_times, n_baselines, n_chans, 1).

    A source in direction ``s`` carries ``exp(+2 pi i f w / c)`` with
    ``w = (x_q - x_p) . s``; multiplying by ``exp(-2 pi i f w0 / c)`` for the
    phase centre ``s0`` leaves a source at the phase centre with zero phase. The
    factor is ``conj(d_p) d_q`` with the per-antenna ``d = exp(-2 pi i f (x . s0) / c)``.
    """
    p, q = meta.baseline_antennas()
    positions = meta.enu_m - meta.enu_m.mean(axis=0)
    w_ant_m = directions_enu @ positions.T  # (n_times, n_ants)
    phase = (-2.0 * np.pi / SPEED_OF_LIGHT_M_S) * w_ant_m[:, :, None] * freqs_hz
    per_antenna = np.exp(1j * phase).astype(np.complex64)  # (n_times, n_ants, n_chans)
    return (np.conj(per_antenna[:, p]) * per_antenna[:, q])[..., None]


def convert_solution_convention(
    jones: NDArray[np.complexfloating[Any, Any]],
) -> NDArray[np.complexfloating[Any, Any]]:
    """Calibration solutions from the files' convention to the reader's, or back: the conjugate.

    hyperdrive solves, and Birli applies, on mwalib's visibilities as the correlator
    wrote them (baseline ``p - q``, unconjugated; hyperdrive conjugates a uvfits or
    measurement set in pyuvdata's convention on reading). The reader conjugates them into
    pyuvdata's convention, in which the same instrument has the conjugate gains. So an
    AO-cal or hyperdrive file's ``J`` applies to the reader's data as ``conj(J)``, and
    solutions solved on the reader's data are written as their conjugate. Conjugating
    twice is the identity, so one function goes both ways.
    """
    return np.conj(jones)


def apply_jones(
    vis: NDArray[np.complex64],
    jones: NDArray[np.complex64] | NDArray[np.complex128],
    meta: ObservationMeta,
) -> None:
    """Apply direction-independent solutions in place: ``V <- J_p V J_q^H``.

    ``jones`` has shape (n_ants, n_chans, 2, 2), in the reader's convention (a file's
    solutions through :func:`convert_solution_convention`); a NaN anywhere in ``J_p`` or
    ``J_q`` makes the result NaN, which the caller flags.
    """
    p, q = meta.baseline_antennas()
    n_times, n_bl, n_chans, _ = vis.shape
    matrices = vis.reshape(n_times, n_bl, n_chans, 2, 2)
    jones64 = jones.astype(np.complex64, copy=False)
    left = jones64[p]  # (n_bl, n_chans, 2, 2)
    right_h = np.conj(jones64[q]).swapaxes(-1, -2)
    result = np.matmul(np.matmul(left[None], matrices), right_h[None])
    vis[...] = result.reshape(vis.shape)


def make_autos_hermitian(vis: NDArray[np.complex64], meta: ObservationMeta) -> None:
    """Drop the rounding residue that leaves autocorrelations not exactly Hermitian.

    pyuvdata refuses to write autocorrelations whose XX/YY have an imaginary part.
    """
    p, q = meta.baseline_antennas()
    autos = np.flatnonzero(p == q)
    block = vis[:, autos]
    block[..., 0].imag = 0.0
    block[..., 3].imag = 0.0
    block[..., 2] = np.conj(block[..., 1])
    vis[:, autos] = block


def _sum_blocks(values: NDArray[Any], time_factor: int, freq_factor: int) -> NDArray[Any]:
    """Sums over blocks of ``time_factor`` x ``freq_factor`` of a (times, bl, chans, pols) array.

    With both factors 1 this is ``values`` itself, not a copy. Adding the few
    slices of each block is several times faster than numpy's reduction over a
    short middle axis; the loops run over the factors only.
    """
    if time_factor == 1 and freq_factor == 1:
        return values
    n_times, n_bl, n_chans, n_pols = values.shape
    chan_sum = values
    if freq_factor > 1:
        by_chan = values.reshape(n_times, n_bl, n_chans // freq_factor, freq_factor, n_pols)
        chan_sum = by_chan[:, :, :, 0].copy()
        for offset in range(1, freq_factor):
            chan_sum += by_chan[:, :, :, offset]
    if time_factor == 1:
        return chan_sum
    by_time = chan_sum.reshape(n_times // time_factor, time_factor, *chan_sum.shape[1:])
    total = by_time[:, 0].copy()
    for offset in range(1, time_factor):
        total += by_time[:, offset]
    return total


def average(
    vis: NDArray[np.complex64],
    weights: NDArray[np.float32],
    flags: NDArray[np.bool_],
    time_factor: int,
    freq_factor: int,
) -> tuple[NDArray[np.complex64], NDArray[np.float32], NDArray[np.bool_]]:
    """Weighted average over blocks of ``time_factor`` integrations and ``freq_factor`` channels.

    Flagged samples carry no weight. An output sample whose inputs are all
    flagged keeps the unweighted mean of its inputs (so the data stay finite and
    meaningful) and is flagged. Returns (vis, summed weights, flags).

    ``vis`` is used as scratch space and overwritten (with both factors 1 it
    becomes the averaged vis): chunks are large (with RFI flagging, hundreds of
    MB) and this keeps the full-size temporaries to the weights.
    ``weights`` and ``flags`` must broadcast to ``vis.shape``.
    """
    n_times, _, n_chans, _ = vis.shape
    if n_times % time_factor or n_chans % freq_factor:
        raise ValueError(
            f"{n_times} integrations x {n_chans} channels do not divide by "
            f"{time_factor} x {freq_factor}"
        )
    effective = np.where(flags, np.float32(0.0), weights)
    weight_sum = _sum_blocks(effective, time_factor, freq_factor)
    out_flags = weight_sum <= 0
    # Only the all-flagged outputs need the plain mean: taken before vis is weighted.
    plain_mean = _sum_blocks(vis, time_factor, freq_factor)[out_flags] / np.float32(
        time_factor * freq_factor
    )
    np.multiply(vis, effective, out=vis)
    del effective
    averaged = _sum_blocks(vis, time_factor, freq_factor)
    np.divide(averaged, weight_sum, out=averaged, where=~out_flags)
    averaged[out_flags] = plain_mean
    return averaged, weight_sum, out_flags
