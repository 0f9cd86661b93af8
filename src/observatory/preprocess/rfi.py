"""RFI flagging with AOFlagger's MWA strategy, one baseline's time-frequency image at a time."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray

_local = threading.local()


def _strategy() -> tuple[Any, Any]:
    """AOFlagger and its MWA default strategy, one per thread (they are not thread-safe)."""
    if not hasattr(_local, "strategy"):
        import aoflagger

        flagger = aoflagger.AOFlagger()
        _local.flagger = flagger
        _local.strategy = flagger.load_strategy_file(
            flagger.find_strategy_file(aoflagger.TelescopeId.MWA)
        )
    return _local.flagger, _local.strategy


def aoflagger_flags(
    vis: NDArray[np.complex64],
    flags: NDArray[np.bool_],
    ant1: NDArray[np.integer],
    ant2: NDArray[np.integer],
) -> NDArray[np.bool_]:
    """Flags AOFlagger raises on the cross-correlations of a chunk not already flagged whole.

    Parameters
    ----------
    vis
        Visibilities, shape (n_times, n_baselines, n_chans, 4).
    flags
        Flags already set, shape (n_times, n_baselines, n_chans); AOFlagger takes them as input.
    ant1, ant2
        Each baseline's antennas (autocorrelations, where they are equal, are not flagged).

    Returns
    -------
    numpy.ndarray
        bool, shape (n_times, n_baselines, n_chans): the new flags (all pols together).
    """
    baselines = np.flatnonzero((ant1 != ant2) & ~flags.all(axis=(0, 2)))
    n_times, _, n_chans, _ = vis.shape
    flagger, strategy = _strategy()
    found = np.zeros(vis.shape[:3], dtype=bool)
    if n_times < 2 or len(baselines) == 0:
        return found
    images = flagger.make_image_set(n_times, n_chans, 8)
    mask = flagger.make_flag_mask(n_times, n_chans, False)
    for baseline in baselines:  # AOFlagger's interface takes one baseline's image set at a time
        # (pols, chans, times): AOFlagger images are height = channels, width = times.
        block = np.ascontiguousarray(vis[:, baseline].transpose(2, 1, 0))
        for pol in range(4):
            images.set_image_buffer(2 * pol, block[pol].real)
            images.set_image_buffer(2 * pol + 1, block[pol].imag)
        mask.set_buffer(np.ascontiguousarray(flags[:, baseline].T))
        result = strategy.run(images, mask)
        found[:, baseline] = result.get_buffer().T
    return found
