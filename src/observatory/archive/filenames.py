"""Recognising MWA file names: which observation, what kind, which coarse channel and batch."""

from __future__ import annotations

import re
from dataclasses import dataclass

from observatory.archive.models import FileKind

_MWAX_VIS = re.compile(
    r"^(?P<obsid>\d{10})_(?P<ts>\d{14})(?P<extra>_[a-z]+)?_ch(?P<chan>\d{3})_(?P<batch>\d{3})\.fits$"
)
_LEGACY = re.compile(
    r"^(?P<obsid>\d{10})_(?P<ts>\d{14})(?P<extra>_[a-z]+)?_gpubox(?P<box>\d{2})(?:_(?P<batch>\d{2}))?\.fits$"
)
_METAFITS = re.compile(r"^(?P<obsid>\d{10})(?:\.metafits|_metafits\.fits)$")
_PPDS = re.compile(r"^(?P<obsid>\d{10})_metafits_ppds\.fits$")
_MWAF = re.compile(r"^(?P<obsid>\d{10})(?P<extra>_[a-z]+)?_(?P<box>\d{2,3})\.mwaf$")
_SUBFILE = re.compile(r"^(?P<obsid>\d{10})_(?P<gps>\d{10})_(?P<chan>\d{1,3})\.sub$")
_LEGACY_VCS = re.compile(r"^(?P<obsid>\d{10})_(?P<gps>\d{10})_ch(?P<chan>\d{3})\.dat$")
_TRUTH = re.compile(r"^(?P<obsid>\d{10})_truth\.json$")


@dataclass(frozen=True)
class ParsedFileName:
    """What a file name says about the file.

    ``coarse_chan`` is the receiver (sky) channel number where the name gives
    it; for legacy gpubox and mwaf files the name gives the gpubox number
    instead (``gpubox_number``), which only the metafits can map to a channel.
    ``note`` explains names that readers such as mwalib will refuse.
    """

    obsid: int
    kind: FileKind
    coarse_chan: int | None = None
    gpubox_number: int | None = None
    batch: int | None = None
    note: str | None = None


def parse_file_name(name: str) -> ParsedFileName | None:
    """Classify an MWA file name; None if it is not one."""
    if match := _METAFITS.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.METAFITS)
    if match := _PPDS.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.PPDS)
    if match := _MWAX_VIS.match(name):
        return ParsedFileName(
            int(match["obsid"]),
            FileKind.MWAX_VIS,
            coarse_chan=int(match["chan"]),
            batch=int(match["batch"]),
            note=_nonstandard_note(match["extra"], "<obsid>_<YYYYMMDDhhmmss>_ch<NNN>_<BBB>.fits"),
        )
    if match := _LEGACY.match(name):
        return ParsedFileName(
            int(match["obsid"]),
            FileKind.LEGACY_GPUBOX,
            gpubox_number=int(match["box"]),
            batch=int(match["batch"]) if match["batch"] is not None else 0,
            note=_nonstandard_note(match["extra"], "<obsid>_<YYYYMMDDhhmmss>_gpubox<NN>_<BB>.fits"),
        )
    if match := _MWAF.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.MWAF, gpubox_number=int(match["box"]))
    if match := _SUBFILE.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.VOLTAGE, coarse_chan=int(match["chan"]))
    if match := _LEGACY_VCS.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.VOLTAGE, coarse_chan=int(match["chan"]))
    if match := _TRUTH.match(name):
        return ParsedFileName(int(match["obsid"]), FileKind.SIM_TRUTH)
    return None


def _nonstandard_note(extra: str | None, standard: str) -> str | None:
    if not extra:
        return None
    return (
        f"name has the extra part {extra!r}: pyuvdata reads it, but mwalib only accepts {standard}"
    )


def legacy_gpubox_channels(receiver_channels: list[int]) -> list[int]:
    """Receiver channel of each legacy gpubox number (index 0 = gpubox01).

    The legacy correlator took channels up to 128 in ascending order and those
    above 128 in descending order (the receivers' frequency inversion).
    """
    low = sorted(c for c in receiver_channels if c <= 128)
    high = sorted((c for c in receiver_channels if c > 128), reverse=True)
    return low + high
