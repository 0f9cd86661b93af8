"""A reader whose data the correlator phased (metafits GEODEL), made from one of unphased data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from observatory.preprocess import corrections

#: mwalib's names for what the correlator phased to (GEODEL 1, 2, 3).
KINDS = ("Zenith", "TilePointing", "AzElTracking")


def correlator_direction(header: fits.Header, applied: str, times_gps: np.ndarray) -> np.ndarray:
    """Where the correlator phased to, from the metafits keys (not the converter's code)."""
    if applied == "Zenith":
        return np.tile([0.0, 0.0, 1.0], (len(times_gps), 1))
    if applied == "TilePointing":
        az, el = np.radians([header["AZIMUTH"], header["ALTITUDE"]])
        return np.tile([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)],
                       (len(times_gps), 1))  # fmt: skip
    return corrections.source_directions_enu((header["RA"], header["DEC"]), times_gps)


def phased_by_the_correlator(open_reader: Callable[..., Any], applied: str) -> Callable[..., Any]:
    """``open_reader``, its readers' metadata saying ``applied`` and their data phased so."""

    def opened(metafits: Path, files: list[Path]) -> Any:
        reader = open_reader(metafits, files)
        reader.meta = dataclasses.replace(reader.meta, geometric_delays_applied=applied)
        header = fits.getheader(metafits)
        read = reader.read

        def read_phased(coarse_chan: int, timesteps: range) -> Any:
            chunk = read(coarse_chan, timesteps)
            centres = chunk.time_start_gps_s + reader.meta.int_time_s / 2
            direction = correlator_direction(header, applied, centres)
            chunk.vis *= corrections.geometric_phasors(reader.meta, direction, chunk.freqs_hz)
            return chunk

        reader.read = read_phased
        return reader

    return opened
