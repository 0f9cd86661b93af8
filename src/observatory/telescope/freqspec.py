"""MWA coarse-channel selections ("freqspecs"), as the triggering services take them.

Grammar: entries separated by ``;``, each one of
``<channel>``, ``<centre>,<width>[,<increment>]`` or ``<start>:<stop>[:<increment>]``
(stop inclusive, increments default to 1). A value may also be a JSON list of
such specs, one observation set per spec. Channel n is centred on 1.28 n MHz;
receivers keep at most 24 of the 256 channels (0..255).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from observatory.core.text import is_ascii_digits
from observatory.core.web import loads_request_json

COARSE_CHAN_WIDTH_MHZ = 1.28
MAX_CHANNEL = 255
MAX_SELECTED = 24


class FreqspecError(ValueError):
    """A malformed freqspec; the message names the spec and the bad token."""


def coarse_channel_centre_mhz(channel: int) -> float:
    """Centre frequency of coarse channel ``channel`` in MHz."""
    return COARSE_CHAN_WIDTH_MHZ * channel


def _integer(spec: str, token: str) -> int:
    """``token`` as an integer: ASCII digits after at most one minus sign.

    Raises
    ------
    FreqspecError
        Naming ``spec`` and ``token`` when it is anything else.
    """
    text = token.strip()
    # One sign only: lstrip("-") let "--5" through to int(), whose bare ValueError named
    # neither the spec nor the token. isdigit() would also take '¹', which int() refuses.
    if not is_ascii_digits(text.removeprefix("-")):
        raise FreqspecError(f"freqspec {spec!r}: token {token!r} is not an integer")
    return int(text)


def _check_channel(spec: str, channel: int) -> None:
    if not 0 <= channel <= MAX_CHANNEL:
        raise FreqspecError(f"freqspec {spec!r}: channel {channel} is outside 0..{MAX_CHANNEL}")


def _positive(spec: str, token: str, what: str) -> int:
    value = _integer(spec, token)
    if value <= 0:
        raise FreqspecError(f"freqspec {spec!r}: {what} {token!r} must be positive")
    return value


def _centred(centre: int, width: int, increment: int) -> list[int]:
    # c,w selects c - w//2 .. c - w//2 + w - 1 (121,24 -> 109..132, as the metafits CENTCHAN shows).
    first = centre - width // 2
    picked = list(range(first, first + width, increment))
    # Picket fence: pad upward past the last pick until there are `width` channels,
    # which reproduces the documented 121,24,3 example.
    next_channel = picked[-1] + 1
    while len(picked) < width:
        picked.append(next_channel)
        next_channel += 1
    return picked


def _entry_channels(spec: str, entry: str) -> list[int]:
    if ":" in entry:
        parts = entry.split(":")
        if len(parts) not in (2, 3):
            raise FreqspecError(
                f"freqspec {spec!r}: range {entry!r} must be start:stop[:increment]"
            )
        start, stop = _integer(spec, parts[0]), _integer(spec, parts[1])
        increment = _positive(spec, parts[2], "increment") if len(parts) == 3 else 1
        if start > stop:
            raise FreqspecError(f"freqspec {spec!r}: range {entry!r} starts after it stops")
        # Checked before the list is made: 1:99999999999 would be gigabytes of channels.
        for channel in (start, stop):
            _check_channel(spec, channel)
        picked = range(start, stop + 1, increment)
        if len(picked) > MAX_SELECTED:
            raise FreqspecError(
                f"freqspec {spec!r}: range {entry!r} selects {len(picked)} channels; "
                f"the receivers keep at most {MAX_SELECTED}"
            )
        return list(picked)
    if "," in entry:
        parts = entry.split(",")
        if len(parts) not in (2, 3):
            raise FreqspecError(f"freqspec {spec!r}: {entry!r} must be centre,width[,increment]")
        centre = _integer(spec, parts[0])
        width = _positive(spec, parts[1], "width")
        increment = _positive(spec, parts[2], "increment") if len(parts) == 3 else 1
        if width > MAX_SELECTED:
            raise FreqspecError(
                f"freqspec {spec!r}: width {width} is more than {MAX_SELECTED} channels"
            )
        return _centred(centre, width, increment)
    return [_integer(spec, entry)]


def parse_freqspec(spec: str) -> list[int]:
    """The sorted coarse channels of one freqspec.

    Raises
    ------
    FreqspecError
        For an empty spec, a non-integer token, a bad width/increment/range, a
        channel outside 0..255, a channel selected twice, or more than 24 channels.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise FreqspecError(f"freqspec {spec!r} is empty")
    channels: list[int] = []
    for entry in spec.split(";"):
        if not entry.strip():
            raise FreqspecError(f"freqspec {spec!r}: empty entry between ';'")
        for channel in _entry_channels(spec, entry.strip()):
            _check_channel(spec, channel)
            if channel in channels:
                raise FreqspecError(f"freqspec {spec!r}: channel {channel} is selected twice")
            channels.append(channel)
    if len(channels) > MAX_SELECTED:
        raise FreqspecError(
            f"freqspec {spec!r} selects {len(channels)} channels; the receivers keep at most {MAX_SELECTED}"
        )
    return sorted(channels)


def parse_freqspecs(value: str | Sequence[str]) -> list[list[int]]:
    """One freqspec, a JSON list of freqspecs, or a Python list: a channel list per spec.

    Raises
    ------
    FreqspecError
        For bad JSON, a JSON value that is not a list of strings, or any bad spec.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                decoded = loads_request_json(text)
            except json.JSONDecodeError as exc:
                raise FreqspecError(f"freqspecs {value!r} is not valid JSON ({exc.msg})") from exc
            if not isinstance(decoded, list) or not all(isinstance(item, str) for item in decoded):
                raise FreqspecError(f"freqspecs {value!r} must be a JSON list of strings")
            specs: Sequence[str] = decoded
        else:
            specs = [text]
    else:
        specs = list(value)
    if not specs:
        raise FreqspecError("freqspecs is an empty list")
    return [parse_freqspec(spec) for spec in specs]


def format_freqspec(channels: Iterable[int]) -> str:
    """A compact freqspec for ``channels``: ``c,w`` when that round-trips, else ``;``-joined ranges."""
    chosen = sorted(set(channels))
    if not chosen:
        raise FreqspecError("no channels to format")
    width = len(chosen)
    centre = chosen[0] + width // 2
    if chosen == _centred(centre, width, 1):
        return f"{centre},{width}"
    runs: list[str] = []
    start = previous = chosen[0]
    for channel in [*chosen[1:], None]:
        if channel is not None and channel == previous + 1:
            previous = channel
            continue
        runs.append(str(start) if start == previous else f"{start}:{previous}")
        if channel is not None:
            start = previous = channel
    return ";".join(runs)
