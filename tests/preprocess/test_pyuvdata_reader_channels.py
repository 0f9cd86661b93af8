"""The fallback reader (pyuvdata, for files mwalib refuses) places each file at the receiver
channel its name gives, at that channel's frequencies, whatever the metafits' channel list.

pyuvdata places a file by its position in the metafits' channel list, counted from the
metafits' centre as if the channels were contiguous: with a picket-fence observation, the
reader used to put the real files on other coarse channels (at other frequencies).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observatory.preprocess.engine import preprocess
from observatory.preprocess.options import ConversionOptions
from observatory.preprocess.reader import PyuvdataReader, RawChunk, ReadError, open_reader
from observatory.telescope.instrument import COARSE_CHAN_WIDTH_HZ
from shared_data import MWA_DATA

MWAX_METAFITS = MWA_DATA / "1320409688.metafits"
MWAX_FILE = MWA_DATA / "1320409688_20211108122750_mini_ch137_000.fits"
LEGACY_METAFITS = MWA_DATA / "1131733552.metafits"
LEGACY_FILES = [
    MWA_DATA / "1131733552_20151116182537_mini_gpubox01_00.fits",
    MWA_DATA / "1131733552_20151116182637_mini_gpubox06_01.fits",
]
#: A picket-fence observation of 24 coarse channels (as many as the real metafits' NCHANS
#: of 768 x 40 kHz hold), in pairs from 62 to 188.
PICKET_FENCE = (62, 63, 69, 70, 76, 77, 84, 85, 93, 94, 103, 104,
                113, 114, 125, 126, 137, 138, 153, 154, 169, 170, 187, 188)  # fmt: skip
#: Three channels up to 128, then 21 above it in two runs: the legacy correlator took the
#: ones above 128 in descending order, so gpubox04 is 169 and gpubox06 is 167.
MOSTLY_HIGH = (100, 101, 102, *range(140, 151), *range(160, 170))
#: Two runs of 12 channels, 120 to 131 and 137 to 148: pyuvdata put ch137 (13th) at 143
#: (the metafits' CENTCHAN), which the metafits lists, so the output was silently wrong.
TWO_RUNS = (*range(120, 132), *range(137, 149))
#: The first fine channel (all a cut-down file holds) of an MWAX coarse channel is centred
#: on its lower edge; a legacy one (four 10 kHz channels averaged) 15 kHz higher.
LEGACY_OFFSET_HZ = 15_000.0


def lower_edge_hz(rec_chan: int) -> float:
    return (rec_chan - 0.5) * COARSE_CHAN_WIDTH_HZ


def with_channels(source: Path, directory: Path, channels: tuple[int, ...]) -> Path:
    """A copy of the metafits ``source`` in ``directory`` whose CHANNELS are ``channels``."""
    assert len(channels) == len(fits.getheader(source)["CHANNELS"].split(","))
    path = directory / source.name
    with fits.open(source) as hdus:
        hdus[0].header["CHANNELS"] = ",".join(map(str, channels))
        hdus.writeto(path)
    return path


def renamed(source: Path, directory: Path, name: str) -> Path:
    """``source`` under another name (a link: the real files stay where they are)."""
    path = directory / name
    path.symlink_to(source)
    return path


def whole(reader: PyuvdataReader, coarse_chan: int) -> RawChunk:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyuvdata's notes on the metafits
        return reader.read(coarse_chan, range(len(reader.time_start_gps_s)))


def open_fallback(metafits: Path, files: list[Path]) -> PyuvdataReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = open_reader(metafits, files)
    assert isinstance(reader, PyuvdataReader)  # mwalib refuses the cut-down files
    return reader


@pytest.mark.parametrize("channel", [137, 62, 188])
def test_an_mwax_file_of_a_picket_fence_is_at_the_channel_its_name_gives(
    tmp_path: Path, channel: int
) -> None:
    """ch137 as it is, and renamed to the lowest and the highest channel of the fence: the
    reader put them at 147, 114 and 137 (pyuvdata's position-from-the-centre frequencies)."""
    metafits = with_channels(MWAX_METAFITS, tmp_path, PICKET_FENCE)
    name = MWAX_FILE.name.replace("_ch137_", f"_ch{channel:03d}_")
    reader = open_fallback(metafits, [renamed(MWAX_FILE, tmp_path, name)])
    assert reader.coarse_chans == (channel,)
    np.testing.assert_array_equal(reader.channel_freqs_hz(channel), [lower_edge_hz(channel)])
    chunk = whole(reader, channel)
    assert chunk.coarse_chan == channel
    np.testing.assert_array_equal(chunk.freqs_hz, [lower_edge_hz(channel)])
    np.testing.assert_array_equal(chunk.chan_index, [0])
    # The same visibilities as the file read with its own (contiguous) metafits.
    shipped = whole(open_fallback(MWAX_METAFITS, [MWAX_FILE]), 137)
    np.testing.assert_array_equal(shipped.freqs_hz, [lower_edge_hz(137)])
    assert np.any(chunk.vis)
    np.testing.assert_array_equal(chunk.vis, shipped.vis)
    np.testing.assert_array_equal(chunk.weights, shipped.weights)


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        # Both gpubox numbers in the ascending part: the 1st and 6th lowest channels.
        (PICKET_FENCE, (62, 77)),
        # gpubox06 in the descending part (the third highest).
        (MOSTLY_HIGH, (100, 167)),
    ],
)
def test_legacy_files_of_a_picket_fence_follow_the_gpubox_order(
    tmp_path: Path, channels: tuple[int, ...], expected: tuple[int, int]
) -> None:
    """gpubox01 and gpubox06 are the legacy correlator's 1st and 6th channels: the metafits
    channels up to 128 ascending, then those above 128 descending (mwalib's mapping too)."""
    import mwalib

    metafits = with_channels(LEGACY_METAFITS, tmp_path, channels)
    by_gpubox = {
        int(c.gpubox_number): int(c.rec_chan_number)
        for c in mwalib.MetafitsContext(str(metafits)).metafits_coarse_chans
    }
    assert (by_gpubox[1], by_gpubox[6]) == expected
    reader = open_fallback(metafits, LEGACY_FILES)
    assert reader.coarse_chans == expected
    # With the metafits as it is (131 to 154), gpubox01 is 154 and gpubox06 149.
    shipped = open_fallback(LEGACY_METAFITS, LEGACY_FILES)
    assert shipped.coarse_chans == (149, 154)
    for channel, shipped_channel in zip(expected, (154, 149), strict=True):
        freqs = [lower_edge_hz(channel) + LEGACY_OFFSET_HZ]
        np.testing.assert_array_equal(reader.channel_freqs_hz(channel), freqs)
        chunk, before = whole(reader, channel), whole(shipped, shipped_channel)
        np.testing.assert_array_equal(chunk.freqs_hz, freqs)
        np.testing.assert_array_equal(chunk.chan_index, [0])
        np.testing.assert_array_equal(
            before.freqs_hz, [lower_edge_hz(shipped_channel) + LEGACY_OFFSET_HZ]
        )
        assert np.any(chunk.vis)
        np.testing.assert_array_equal(chunk.vis, before.vis)


def test_a_picket_fence_converts_at_the_frequencies_of_its_files(tmp_path: Path) -> None:
    """The output's frequency axis: coarse channel 137's, not 143's (7.68 MHz higher)."""
    metafits = with_channels(MWAX_METAFITS, tmp_path, TWO_RUNS)
    options = ConversionOptions.from_params({"no_rfi": "true", "allow_missing": "true"})
    (out,) = preprocess(metafits, [MWAX_FILE], options, tmp_path / "picket.uvfits")
    from pyuvdata import UVData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = UVData.from_file(str(out), read_data=False)
    np.testing.assert_array_equal(written.freq_array.ravel(), [lower_edge_hz(137)])


def test_a_file_of_a_channel_the_metafits_lacks_is_refused_naming_it(tmp_path: Path) -> None:
    """It was read at 0 Hz (coarse channel 0)."""
    stray = renamed(MWAX_FILE, tmp_path, MWAX_FILE.name.replace("_ch137_", "_ch160_"))
    message = r"ch160_000\.fits: coarse channel 160 is not one of the metafits' channels \(131, "
    with pytest.raises(ReadError, match=message):
        open_reader(MWAX_METAFITS, [stray])


def test_a_gpubox_number_beyond_the_observation_is_refused_naming_it(tmp_path: Path) -> None:
    stray = renamed(LEGACY_FILES[0], tmp_path, LEGACY_FILES[0].name.replace("gpubox01", "gpubox25"))
    message = r"gpubox25_00\.fits: gpubox 25 does not exist in an observation of 24 coarse"
    with pytest.raises(ReadError, match=message):
        open_reader(LEGACY_METAFITS, [stray])


def test_the_correlator_is_the_files_not_the_metafits_mode(tmp_path: Path) -> None:
    """Early MWAX observations have MODE = 'HW_LFILES': the DC channel and the passband are
    the MWAX correlator's when its files are read, as with mwalib (it took the MODE's)."""
    metafits = tmp_path / MWAX_METAFITS.name
    with fits.open(MWAX_METAFITS) as hdus:
        hdus[0].header["MODE"] = "HW_LFILES"
        hdus.writeto(metafits)
    reader = open_fallback(metafits, [MWAX_FILE])
    assert reader.meta.mwax
    np.testing.assert_array_equal(reader.channel_freqs_hz(137), [lower_edge_hz(137)])
    legacy = open_fallback(LEGACY_METAFITS, LEGACY_FILES)
    assert not legacy.meta.mwax


def test_files_of_two_correlators_are_refused(tmp_path: Path) -> None:
    from observatory.preprocess.reader import read_metadata

    meta = read_metadata(MWAX_METAFITS)
    legacy_named = renamed(
        LEGACY_FILES[0], tmp_path, "1320409688_20211108122750_mini_gpubox01_00.fits"
    )
    with pytest.raises(ReadError, match=r"two correlators .* give the files of one"):
        PyuvdataReader(MWAX_METAFITS, [MWAX_FILE, legacy_named], meta)
