"""Conversion options: the ASVO conversion-job keys, their defaults and their validation.

The same object serves the ASVO API (form fields, all strings), the
``observatory preprocess`` CLI and the library. Keys follow the ASVO table
(../shared/specs/asvo.md section 5); the older key names that MWA users still
have in their CSV files (``timeres``, ``freqres``, ``edgewidth``,
``conversion``, ``calibrate``, ``flagdcchannels``, ...) are accepted too.
Unknown keys are ignored, as the ASVO clients send extra ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum

#: Tolerance for "exact multiple" checks (Birli uses 1e-6).
MULTIPLE_TOLERANCE = 1e-6
DEFAULT_FLAG_EDGE_WIDTH_KHZ = 80.0


class OptionError(ValueError):
    """A bad conversion option; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not valid: {allowed}")
        self.key = key
        self.value = value


class OutputFormat(StrEnum):
    """What the conversion writes."""

    UVFITS = "uvfits"
    MS = "ms"
    BOTH = "both"


class PhaseCentre(StrEnum):
    """Where the output is phased."""

    PHASE = "phase"
    POINTING = "pointing"
    CUSTOM = "custom"


# Older ASVO / cotter-era names, as in the mwa_client guide's example CSV line.
LEGACY_KEYS = {
    "timeres": "avg_time_res",
    "freqres": "avg_freq_res",
    "edgewidth": "flag_edge_width",
    "conversion": "output",
    "calibrate": "apply_di_cal",
    "allowmissing": "allow_missing",
    "norfi": "no_rfi",
    "usepcentre": "centre_pointing",
    "phasecentre": "centre_custom",
    "nogeom": "no_geometric_delay",
    "nosbgains": "no_digital_gains",
}
#: cotter's switches for what our conversions always do (true) or never offer: a value
#: asking for the other behaviour is refused rather than silently not honoured.
COTTER_SWITCHES = {
    "noflagautos": (True, "autocorrelations are never flagged"),
    "noantennapruning": (True, "flagged antennas are always kept (flagged)"),
    "nostats": (True, "no statistics are collected"),
    "noflagmissings": (False, "missing coarse channels are always flagged"),
}


def parse_bool(key: str, value: object) -> bool:
    """Parse the ASVO clients' booleans (``true``/``false``, also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "y", "t", "on"}:
        return True
    if text in {"false", "0", "no", "n", "f", "off", ""}:
        return False
    raise OptionError(key, value, "expected true or false")


_RA_TEXT = r"\d+(?:\.\d*)?|\d{1,2}h\d{1,2}m\d{1,2}(?:\.\d*)?s?|\d{1,2}:\d{1,2}:\d{1,2}(?:\.\d*)?"
_DEC_TEXT = r"\d+(?:\.\d*)?|\d{1,2}d\d{1,2}m\d{1,2}(?:\.\d*)?s?|\d{1,2}:\d{1,2}:\d{1,2}(?:\.\d*)?"
#: ``RA Dec``: separated by spaces, or by nothing before a signed Dec or after ``s`` (the
#: mwa_client CSV removes spaces: ``18h33m41.89s -03d39m04.25s`` arrives without them).
_CENTRE = re.compile(
    rf"\s*(?P<ra>{_RA_TEXT})(?:\s+|(?=[+-])|(?<=s)(?=\d))(?P<dec>[+-]?(?:{_DEC_TEXT}))\s*"
)
_CENTRE_FORMS = (
    "expected 'RA Dec' as cotter's -centre takes it: 18h33m41.89s -03d39m04.25s, "
    "18:33:41.89 -03:39:04.25 (hours, degrees) or 278.42 -3.65 (degrees, ICRS)"
)


def _sexagesimal(text: str) -> float | None:
    """``12h34m56.7s`` / ``-12d34m56.7s`` / ``12:34:56.7`` / ``12.5`` as a number of units;
    None when minutes or seconds are not below 60 (``12:99:99`` is a typo, not 13:40:39)."""
    parts = [float(part) for part in re.split(r"[hdm:]", text.rstrip("s").lstrip("+-")) if part]
    if any(part >= 60.0 for part in parts[1:]):
        return None
    value = sum(part / 60.0**index for index, part in enumerate(parts))
    return -value if text.startswith("-") else value


def parse_centre(value: object) -> tuple[float, float]:
    """A custom phase centre ``RA Dec`` (the legacy ``phasecentre`` key) as degrees.

    Sexagesimal RA (``h``/``m``/``s`` or colons) is in hours, a plain number in degrees.

    Raises
    ------
    OptionError
        If the value is not one of those forms or is out of range.
    """
    text = str(value).strip()
    match = _CENTRE.fullmatch(text)
    if match is None:
        raise OptionError("phasecentre", value, _CENTRE_FORMS)
    ra_text, dec_text = match["ra"], match["dec"]
    ra_units, dec_deg = _sexagesimal(ra_text), _sexagesimal(dec_text)
    if ra_units is None or dec_deg is None:
        raise OptionError("phasecentre", value, "minutes and seconds must be below 60")
    ra_deg = ra_units * (15.0 if any(c in ra_text for c in "h:") else 1.0)
    if not 0.0 <= ra_deg < 360.0 or not -90.0 <= dec_deg <= 90.0:
        raise OptionError(
            "phasecentre", value, "RA must be in 0..24 h (0..360 degrees), Dec in -90..90 degrees"
        )
    return ra_deg, dec_deg


#: A number as people write one: ASCII digits, a point, an exponent (``float`` also reads
#: ``1_6`` as 16 and other scripts' digits).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _parse_float(key: str, value: object, low: float, high: float, unit: str) -> float:
    text = str(value).strip()
    if not _NUMBER.fullmatch(text):
        raise OptionError(key, value, f"expected a number of {unit} in {low:g}..{high:g}")
    number = float(text)
    if not math.isfinite(number) or not low <= number <= high:
        raise OptionError(key, value, f"must be between {low:g} and {high:g} {unit}")
    return number


def same_value(first: object, second: object) -> bool:
    """Whether two spellings of an option ask for one thing (``16`` and ``16.0`` do).

    The rule for an option given under two names (``timeres`` and ``avg_time_res``), here
    and in the mwa_client job file.
    """
    texts = [str(first).strip().lower(), str(second).strip().lower()]
    if texts[0] == texts[1]:
        return True
    if all(_NUMBER.fullmatch(text) for text in texts):
        return float(texts[0]) == float(texts[1])
    return False


def is_multiple(value: float, base: float) -> bool:
    """Whether ``value`` is a whole multiple (>= 1) of ``base``, within Birli's tolerance."""
    ratio = value / base
    return ratio >= 1 - MULTIPLE_TOLERANCE and abs(ratio - round(ratio)) <= MULTIPLE_TOLERANCE


@dataclass(frozen=True)
class ConversionOptions:
    """Everything a conversion can be asked to do. Defaults are the ASVO server's.

    Attributes
    ----------
    output
        uvfits, ms, or both (two files).
    avg_time_res_s, avg_freq_res_khz
        Target resolutions; None keeps the native resolution. Must be whole
        multiples of the native integration time / fine-channel width.
    flag_edge_width_khz
        Flagged at each edge of every coarse channel; 0 disables. When not
        given, 80 kHz rounded up to whole fine channels, or no edge flagging if
        that would cover half a coarse channel or more.
    no_rfi
        Skip AOFlagger.
    no_geometric_delay, no_cable_delay, no_digital_gains, no_passband_gains
        Skip that correction.
    flag_dc
        Flag the DC fine channel; None means Birli's default (legacy data only).
    apply_di_cal
        Apply the best direction-independent calibration solution.
    centre, phase_centre_ra_deg, phase_centre_dec_deg
        Phase centre: the metafits phase centre, the pointing centre, or custom.
    allow_missing
        Convert even if some coarse channels have no files.
    """

    output: OutputFormat = OutputFormat.UVFITS
    avg_time_res_s: float | None = None
    avg_freq_res_khz: float | None = None
    flag_edge_width_khz: float | None = None
    no_rfi: bool = False
    no_geometric_delay: bool = False
    no_cable_delay: bool = False
    no_digital_gains: bool = False
    no_passband_gains: bool = False
    flag_dc: bool | None = None
    apply_di_cal: bool = False
    centre: PhaseCentre = PhaseCentre.PHASE
    phase_centre_ra_deg: float | None = None
    phase_centre_dec_deg: float | None = None
    allow_missing: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> ConversionOptions:
        """Build options from ASVO key=value parameters (strings), ignoring unknown keys.

        Raises
        ------
        OptionError
            Naming the first bad key, its value and the allowed range.
        """
        values: dict[str, object] = {}
        normalised: dict[str, object] = {}
        spelled: dict[str, str] = {}  # key -> how the request spelled it
        for raw_key, value in params.items():
            given = raw_key.strip().lower()
            key = LEGACY_KEYS.get(given, given)
            if key in normalised and not same_value(normalised[key], value):
                raise OptionError(
                    key, value, f"contradicts {spelled[key]}={normalised[key]} (the same option "
                    "under another name); give one",
                )  # fmt: skip
            normalised[key], spelled[key] = value, raw_key.strip()
        for key, (supported, behaviour) in COTTER_SWITCHES.items():
            if key in normalised and parse_bool(key, normalised[key]) != supported:
                raise OptionError(key, normalised[key], f"not offered: {behaviour}")
        if "output" in normalised:
            text = str(normalised["output"]).strip().lower()
            try:
                values["output"] = OutputFormat(text)
            except ValueError:
                raise OptionError(
                    "output", normalised["output"], "expected uvfits, ms or both"
                ) from None
        if _given(normalised, "avg_time_res"):
            values["avg_time_res_s"] = _parse_float(
                "avg_time_res", normalised["avg_time_res"], 0.25, 32.0, "s"
            )
        if _given(normalised, "avg_freq_res"):
            values["avg_freq_res_khz"] = _parse_float(
                "avg_freq_res", normalised["avg_freq_res"], 0.2, 1280.0, "kHz"
            )
        if _given(normalised, "flag_edge_width"):
            width = _parse_float(
                "flag_edge_width", normalised["flag_edge_width"], 0.0, 640.0, "kHz"
            )
            values["flag_edge_width_khz"] = width
        for key in ("no_rfi", "no_geometric_delay", "no_cable_delay", "no_digital_gains",
                    "no_passband_gains", "apply_di_cal", "allow_missing"):  # fmt: skip
            if key in normalised:
                values[key] = parse_bool(key, normalised[key])
        # Three spellings: Birli's --flag-dc (what to_params stores), its --no-flag-dc (the
        # ASVO key) and cotter's flagdcchannels (old mwa_client CSVs). no_flag_dc=false
        # asks for nothing (the default); spellings that disagree are refused, as no
        # order between them is more right than another.
        dc_choices: dict[str, bool] = {}
        for key in ("flag_dc", "flagdcchannels"):
            if _given(normalised, key):
                dc_choices[key] = parse_bool(key, normalised[key])
        if "no_flag_dc" in normalised and parse_bool("no_flag_dc", normalised["no_flag_dc"]):
            dc_choices["no_flag_dc"] = False
        if len(set(dc_choices.values())) > 1:
            given = ", ".join(
                f"{key}={'true' if key == 'no_flag_dc' else str(flag).lower()}"
                for key, flag in dc_choices.items()
            )
            raise OptionError(
                "no_flag_dc" if "no_flag_dc" in dc_choices else "flag_dc",
                normalised.get("no_flag_dc", normalised.get("flag_dc")),
                f"contradicts the other DC-channel options ({given}); give one",
            )
        if dc_choices:
            values["flag_dc"] = next(iter(dc_choices.values()))
        # Four ways to choose the phase centre: centre=..., usepcentre=true (cotter's
        # pointing centre), phasecentre=RA Dec and phase_centre_ra/dec (a custom one).
        # usepcentre=false asks for nothing; choices that disagree are refused, naming
        # the keys as the request wrote them, rather than one silently winning.
        asked: list[tuple[str, object, PhaseCentre]] = []  # (key as written, value, centre)
        for key, value in normalised.items():
            if key == "centre" and str(value).strip():
                try:
                    asked.append((spelled[key], value, PhaseCentre(str(value).strip().lower())))
                except ValueError:
                    raise OptionError(
                        spelled[key], value, "expected phase, pointing or custom"
                    ) from None
            elif key == "centre_pointing" and parse_bool(spelled[key], value):
                asked.append((spelled[key], value, PhaseCentre.POINTING))
            elif key in ("centre_custom", "phase_centre_ra", "phase_centre_dec") and _given(
                normalised, key
            ):
                asked.append((spelled[key], value, PhaseCentre.CUSTOM))
        if asked:
            first_centre = asked[0][2]
            for key, value, centre in asked:
                if centre != first_centre:
                    given = ", ".join(f"{k}={str(v).strip()}" for k, v, _ in asked)
                    raise OptionError(
                        key,
                        value,
                        f"contradicts the other phase-centre options ({given}); give one",
                    )
            values["centre"] = first_centre
        if _given(normalised, "phase_centre_ra"):
            values["phase_centre_ra_deg"] = _parse_float(
                "phase_centre_ra", normalised["phase_centre_ra"], 0.0, 360.0, "degrees"
            )
        if _given(normalised, "phase_centre_dec"):
            values["phase_centre_dec_deg"] = _parse_float(
                "phase_centre_dec", normalised["phase_centre_dec"], -90.0, 90.0, "degrees"
            )
        if _given(normalised, "centre_custom"):
            if "phase_centre_ra_deg" in values or "phase_centre_dec_deg" in values:
                raise OptionError(
                    "phasecentre", normalised["centre_custom"],
                    "give either phasecentre or phase_centre_ra/phase_centre_dec, not both",
                )  # fmt: skip
            ra_deg, dec_deg = parse_centre(normalised["centre_custom"])
            values["phase_centre_ra_deg"], values["phase_centre_dec_deg"] = ra_deg, dec_deg
        options = cls(**values)  # type: ignore[arg-type]
        options.validate()
        return options

    def validate(self) -> None:
        """Check the options against each other (not against an observation).

        Raises
        ------
        OptionError
            If ``centre=custom`` lacks a coordinate, or coordinates come with another centre.
        """
        has_coords = self.phase_centre_ra_deg is not None or self.phase_centre_dec_deg is not None
        if self.centre == PhaseCentre.CUSTOM:
            if self.phase_centre_ra_deg is None:
                raise OptionError(
                    "phase_centre_ra", None, "required (degrees, 0..360) with centre=custom"
                )
            if self.phase_centre_dec_deg is None:
                raise OptionError(
                    "phase_centre_dec", None, "required (degrees, -90..90) with centre=custom"
                )
        elif has_coords:
            raise OptionError("centre", self.centre.value, "phase_centre_ra/dec need centre=custom")

    def to_params(self) -> dict[str, str]:
        """The options as ASVO key=value strings (only those differing from the defaults)."""
        defaults = ConversionOptions()
        names = {
            "avg_time_res_s": "avg_time_res",
            "avg_freq_res_khz": "avg_freq_res",
            "flag_edge_width_khz": "flag_edge_width",
            "phase_centre_ra_deg": "phase_centre_ra",
            "phase_centre_dec_deg": "phase_centre_dec",
        }
        params: dict[str, str] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value == getattr(defaults, spec.name):
                continue
            if spec.name == "flag_dc":  # the ASVO key when off; from_params reads both
                params["no_flag_dc" if value is False else "flag_dc"] = "true"
                continue
            key = names.get(spec.name, spec.name)
            params[key] = str(value).lower() if isinstance(value, bool) else f"{value}"
        return params

    def dc_flagged(self, mwax: bool) -> bool:
        """Whether the DC fine channel is flagged: as asked, else on legacy data only.

        The legacy correlator's centre fine channel of each coarse channel holds the
        PFB's DC offset; MWAX's does not (Birli's default).
        """
        return (not mwax) if self.flag_dc is None else self.flag_dc

    def resolve(
        self, int_time_s: float, fine_chan_khz: float, fine_chans_per_coarse: int
    ) -> ResolvedOptions:
        """Check the options against an observation's native resolution.

        Raises
        ------
        OptionError
            If a resolution is not an exact whole multiple of the native one, or
            the edge width is not a multiple of the fine channel or covers half a
            coarse channel or more.
        """
        time_factor = 1
        if self.avg_time_res_s is not None:
            if not is_multiple(self.avg_time_res_s, int_time_s):
                raise OptionError(
                    "avg_time_res", self.avg_time_res_s,
                    f"must be a whole multiple of the integration time {int_time_s:g} s",
                )  # fmt: skip
            time_factor = round(self.avg_time_res_s / int_time_s)
        freq_factor = 1
        if self.avg_freq_res_khz is not None:
            if not is_multiple(self.avg_freq_res_khz, fine_chan_khz):
                raise OptionError(
                    "avg_freq_res", self.avg_freq_res_khz,
                    f"must be a whole multiple of the fine channel width {fine_chan_khz:g} kHz",
                )  # fmt: skip
            freq_factor = round(self.avg_freq_res_khz / fine_chan_khz)
            if fine_chans_per_coarse % freq_factor:
                raise OptionError(
                    "avg_freq_res", self.avg_freq_res_khz,
                    f"must divide the {fine_chans_per_coarse} fine channels of a coarse channel evenly",
                )  # fmt: skip
        if self.flag_edge_width_khz is None:
            edge_chans = math.ceil(DEFAULT_FLAG_EDGE_WIDTH_KHZ / fine_chan_khz - MULTIPLE_TOLERANCE)
            if 2 * edge_chans >= fine_chans_per_coarse:
                edge_chans = 0
        elif self.flag_edge_width_khz == 0:
            edge_chans = 0
        else:
            if not is_multiple(self.flag_edge_width_khz, fine_chan_khz):
                raise OptionError(
                    "flag_edge_width", self.flag_edge_width_khz,
                    f"must be a whole multiple of the fine channel width {fine_chan_khz:g} kHz (or 0)",
                )  # fmt: skip
            edge_chans = round(self.flag_edge_width_khz / fine_chan_khz)
            if 2 * edge_chans >= fine_chans_per_coarse:
                raise OptionError(
                    "flag_edge_width", self.flag_edge_width_khz,
                    f"must cover fewer than half of the {fine_chans_per_coarse} fine channels of a coarse channel",
                )  # fmt: skip
        return ResolvedOptions(self, time_factor, freq_factor, edge_chans)


def _given(values: Mapping[str, object], key: str) -> bool:
    return key in values and str(values[key]).strip() != ""


@dataclass(frozen=True)
class ResolvedOptions:
    """Options resolved against an observation: averaging factors and edge channels."""

    options: ConversionOptions
    time_factor: int
    freq_factor: int
    edge_chans: int
