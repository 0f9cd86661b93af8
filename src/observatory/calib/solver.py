"""Direction-independent gain solving: StEFCal, vectorised over channels and polarisations.

The measurement equation is ``R_pq = g_p M_pq conj(g_q)`` per channel and
polarisation (XX and YY: diagonal Jones), with ``R`` the data and ``M`` the model
visibilities. StEFCal (Salvini & Wijnholds 2014; the "MitchCal" update of
``calibrate`` and hyperdrive) alternates the least-squares update of every
antenna's gain with the others held fixed::

    g_p <- sum_q conj(M_pq) g_q R_pq / sum_q |M_pq|^2 |g_q|^2

averaging each new estimate with the previous one every second iteration. With
``A = conj(M) * R`` and ``B = |M|^2`` built once as Hermitian antenna-by-antenna
matrices (summed over time), an iteration is two batched matrix-vector products
over all channels and polarisations at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Solution:
    """Gains and how the solve went.

    Attributes
    ----------
    gains
        complex128 (n_chan, n_ant, 2): instrument gains of XX and YY
        (``R = g M g^H``), phase-referenced to ``reference_antenna``; NaN where an
        antenna or channel had no data or did not converge.
    iterations
        Iterations used per (channel, polarisation).
    converged
        Per (channel, polarisation): the relative change fell below the tolerance
        (False where there was no data to solve).
    precision
        Last relative change per (channel, polarisation); NaN where there was no data.
    """

    gains: NDArray[np.complex128]
    iterations: NDArray[np.int64]
    converged: NDArray[np.bool_]
    precision: NDArray[np.float64]
    reference_antenna: int

    def jones(self) -> NDArray[np.complex128]:
        """AO-cal / hyperdrive solutions (n_chan, n_ant, 4): the inverse gains, applied by multiplying."""
        n_chan, n_ant, _ = self.gains.shape
        out = np.zeros((n_chan, n_ant, 4), dtype=np.complex128)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[..., 0] = 1.0 / self.gains[..., 0]
            out[..., 3] = 1.0 / self.gains[..., 1]
        bad = ~np.isfinite(out[..., 0]) | ~np.isfinite(out[..., 3])
        out[bad] = np.nan
        return out


def normal_matrices(
    data: NDArray[np.complexfloating],
    model: NDArray[np.complexfloating],
    ant1: NDArray[np.integer],
    ant2: NDArray[np.integer],
    n_ant: int,
    weights: NDArray[np.floating] | None = None,
) -> tuple[NDArray[np.complex128], NDArray[np.float64]]:
    """``A = sum_t w conj(M) R`` and ``B = sum_t w |M|^2`` as (n_chan, 2, n_ant, n_ant) matrices.

    Parameters
    ----------
    data, model
        (n_time, n_baseline, n_chan, 2): XX and YY visibilities of baselines
        ``ant1[b] - ant2[b]`` (cross-correlations only, each baseline once).
    weights
        Same shape, 0 for flagged samples; default 1.
    """
    w = (
        np.ones(data.shape, dtype=np.float64)
        if weights is None
        else np.asarray(weights, np.float64)
    )
    cross = np.asarray(ant1) != np.asarray(ant2)
    a = np.sum(w * np.conj(model) * data, axis=0)[cross]  # (n_bl, n_chan, 2)
    b = np.sum(w * np.abs(model) ** 2, axis=0)[cross]
    p, q = np.asarray(ant1)[cross], np.asarray(ant2)[cross]
    n_chan = data.shape[2]
    big_a = np.zeros((n_chan, 2, n_ant, n_ant), dtype=np.complex128)
    big_b = np.zeros((n_chan, 2, n_ant, n_ant), dtype=np.float64)
    a_cp = a.transpose(1, 2, 0)  # (n_chan, 2, n_bl)
    b_cp = b.transpose(1, 2, 0)
    # R_qp = conj(R_pq) and M_qp = conj(M_pq): the lower triangle is the conjugate.
    big_a[:, :, p, q] = a_cp
    big_a[:, :, q, p] = np.conj(a_cp)
    big_b[:, :, p, q] = b_cp
    big_b[:, :, q, p] = b_cp
    return big_a, big_b


def stefcal(
    big_a: NDArray[np.complex128],
    big_b: NDArray[np.float64],
    *,
    max_iterations: int = 500,
    tolerance: float = 1e-10,
    reference_antenna: int | None = None,
) -> Solution:
    """Solve ``R = g M g^H`` from the normal matrices of :func:`normal_matrices`.

    Channels and polarisations iterate together; each stops changing once its
    relative update is below ``tolerance``. An antenna with no data gets NaN.
    The phases are referenced to ``reference_antenna`` (default: the first
    antenna with data).
    """
    n_chan, n_pol, n_ant, _ = big_a.shape
    has_data = big_b.sum(axis=3) > 0  # (n_chan, n_pol, n_ant)
    gains = np.where(has_data, 1.0 + 0.0j, 0.0)
    # A channel and polarisation with no data (flagged) has nothing to solve: it is not
    # iterated, and stays unconverged with NaN precision (its zero update read as converged).
    active = has_data.any(axis=2)
    iterations = np.zeros((n_chan, n_pol), dtype=np.int64)
    precision = np.where(active, np.inf, np.nan)
    for iteration in range(1, max_iterations + 1):
        idx = np.flatnonzero(active.ravel())
        if idx.size == 0:
            break
        a = big_a.reshape(n_chan * n_pol, n_ant, n_ant)[idx]
        b = big_b.reshape(n_chan * n_pol, n_ant, n_ant)[idx]
        g = gains.reshape(n_chan * n_pol, n_ant)[idx]
        numerator = np.einsum("kpq,kq->kp", a, g)
        denominator = np.einsum("kpq,kq->kp", b, np.abs(g) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(denominator > 0, numerator / denominator, 0.0)
        if iteration % 2 == 0:
            new = 0.5 * (new + g)
        change = np.linalg.norm(new - g, axis=1) / np.maximum(np.linalg.norm(new, axis=1), 1e-300)
        flat_gains = gains.reshape(n_chan * n_pol, n_ant)
        flat_gains[idx] = new
        precision.ravel()[idx] = change
        iterations.ravel()[idx] = iteration
        active.ravel()[idx] = change >= tolerance
    converged = precision < tolerance
    gains = gains.transpose(0, 2, 1).copy()  # (n_chan, n_ant, n_pol)
    no_data = ~has_data.transpose(0, 2, 1)
    gains[no_data] = np.nan
    gains[~converged[:, None, :].repeat(n_ant, axis=1)] = np.nan
    # An antenna whose data are all zero (a dead receiver, data that never arrived, written
    # as zeros) converges to a gain of 0: no solution. As the default reference it made
    # every antenna's solution NaN (a phase of 0 + 0j).
    gains[gains == 0] = np.nan
    if reference_antenna is None:
        with_data = np.flatnonzero(np.isfinite(gains).any(axis=(0, 2)))
        reference_antenna = int(with_data[0]) if with_data.size else 0
    reference = gains[:, reference_antenna : reference_antenna + 1, :]
    # Where the reference antenna has no solution (no data in that channel: lost packets,
    # all its baselines flagged), that channel is referenced to its first antenna with one:
    # a phase common to a channel's antennas cancels in J_p V J_q^H. It made every
    # antenna's solution there NaN.
    first_solved = np.argmax(np.isfinite(gains), axis=1)[:, None, :]  # (chan, 1, pol)
    reference = np.where(
        np.isfinite(reference), reference, np.take_along_axis(gains, first_solved, axis=1)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = gains * np.conj(reference) / np.abs(reference)
    return Solution(gains, iterations, converged, precision, reference_antenna)
