from dataclasses import fields

import pytest

from observatory.preprocess.options import (
    ConversionOptions,
    OptionError,
    OutputFormat,
    PhaseCentre,
    is_multiple,
)


def test_defaults() -> None:
    options = ConversionOptions.from_params({})
    assert options == ConversionOptions()
    assert options.output == OutputFormat.UVFITS
    assert options.centre == PhaseCentre.PHASE
    assert not options.no_rfi and options.flag_dc is None


def test_giant_squid_defaults_and_unknown_keys() -> None:
    options = ConversionOptions.from_params(
        {"output": "uvfits", "avg_freq_res": "80", "flag_edge_width": "80", "delivery": "acacia",
         "obs_id": "1320409688", "job_type": "c", "something_new": "x"}
    )  # fmt: skip
    assert options.avg_freq_res_khz == 80.0
    assert options.flag_edge_width_khz == 80.0


def test_every_key() -> None:
    options = ConversionOptions.from_params(
        {
            "output": "ms", "avg_time_res": "4", "avg_freq_res": "40", "flag_edge_width": "0",
            "no_rfi": "true", "no_geometric_delay": "true", "no_cable_delay": "TRUE",
            "no_digital_gains": "1", "no_passband_gains": "yes", "no_flag_dc": "true",
            "apply_di_cal": "true", "centre": "custom", "phase_centre_ra": "10.5",
            "phase_centre_dec": "-27.0",
        }
    )  # fmt: skip
    assert options.output == OutputFormat.MS
    assert (options.avg_time_res_s, options.avg_freq_res_khz, options.flag_edge_width_khz) == (
        4,
        40,
        0,
    )
    assert options.no_rfi and options.no_geometric_delay and options.no_cable_delay
    assert options.no_digital_gains and options.no_passband_gains and options.apply_di_cal
    assert options.flag_dc is False
    assert options.centre == PhaseCentre.CUSTOM
    assert (options.phase_centre_ra_deg, options.phase_centre_dec_deg) == (10.5, -27.0)
    assert ConversionOptions.from_params(options.to_params()) == options


def test_legacy_guide_line() -> None:
    # The example line of the mwa_client guide.
    line = "obs_id=1110103576, job_type=c, timeres=8, freqres=40, edgewidth=80, conversion=ms, calibrate=true, allowmissing=true, flagdcchannels=true"
    params = dict(cell.strip().split("=", 1) for cell in line.split(","))
    options = ConversionOptions.from_params(params)
    assert options.avg_time_res_s == 8 and options.avg_freq_res_khz == 40
    assert options.flag_edge_width_khz == 80 and options.output == OutputFormat.MS
    assert options.apply_di_cal and options.allow_missing and options.flag_dc is True


@pytest.mark.parametrize(
    ("params", "key", "fragment"),
    [
        ({"output": "fits"}, "output", "uvfits, ms or both"),
        ({"avg_time_res": "abc"}, "avg_time_res", "expected a number"),
        ({"avg_time_res": "100"}, "avg_time_res", "between 0.25 and 32"),
        ({"avg_freq_res": "0"}, "avg_freq_res", "between 0.2 and 1280"),
        ({"avg_freq_res": "nan"}, "avg_freq_res", "expected a number of kHz in 0.2..1280"),
        ({"flag_edge_width": "-1"}, "flag_edge_width", "between 0 and 640"),
        ({"no_rfi": "maybe"}, "no_rfi", "true or false"),
        ({"centre": "moon"}, "centre", "phase, pointing or custom"),
        ({"centre": "custom"}, "phase_centre_ra", "required"),
        ({"centre": "custom", "phase_centre_ra": "10"}, "phase_centre_dec", "required"),
        (
            {"phase_centre_ra": "400", "phase_centre_dec": "0"},
            "phase_centre_ra",
            "between 0 and 360",
        ),
        (
            {"phase_centre_ra": "10", "phase_centre_dec": "-91"},
            "phase_centre_dec",
            "between -90 and 90",
        ),
        (
            {"centre": "pointing", "phase_centre_ra": "10", "phase_centre_dec": "1"},
            "phase_centre_ra",
            "contradicts the other phase-centre options (centre=pointing, phase_centre_ra=10, "
            "phase_centre_dec=1); give one",
        ),
        # float() reads these as 16 and 8: not numbers as anyone writes them.
        ({"avg_time_res": "1_6"}, "avg_time_res", "expected a number"),
        ({"avg_freq_res": "\u0668"}, "avg_freq_res", "expected a number"),
    ],
)
def test_bad_values_name_key_value_and_range(
    params: dict[str, str], key: str, fragment: str
) -> None:
    with pytest.raises(OptionError) as caught:
        ConversionOptions.from_params(params)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}=")
    assert fragment in str(caught.value)


def test_resolve_factors_and_edges() -> None:
    resolved = ConversionOptions(avg_time_res_s=8, avg_freq_res_khz=80).resolve(2.0, 40.0, 32)
    assert (resolved.time_factor, resolved.freq_factor, resolved.edge_chans) == (4, 2, 2)
    native = ConversionOptions().resolve(0.5, 10.0, 128)
    assert (native.time_factor, native.freq_factor, native.edge_chans) == (1, 1, 8)
    # 640 kHz channels: the 80 kHz default cannot be honoured, so no edge flagging by default.
    assert ConversionOptions().resolve(0.5, 640.0, 2).edge_chans == 0
    assert ConversionOptions(flag_edge_width_khz=0).resolve(2.0, 40.0, 32).edge_chans == 0


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        (
            ConversionOptions(avg_time_res_s=3),
            "avg_time_res",
            "whole multiple of the integration time 2 s",
        ),
        (ConversionOptions(avg_time_res_s=1), "avg_time_res", "whole multiple"),
        (
            ConversionOptions(avg_freq_res_khz=60),
            "avg_freq_res",
            "whole multiple of the fine channel width 40 kHz",
        ),
        (ConversionOptions(avg_freq_res_khz=120), "avg_freq_res", "divide the 32 fine channels"),
        (ConversionOptions(flag_edge_width_khz=50), "flag_edge_width", "whole multiple"),
        (ConversionOptions(flag_edge_width_khz=640), "flag_edge_width", "fewer than half"),
    ],
)
def test_resolve_errors(options: ConversionOptions, key: str, fragment: str) -> None:
    with pytest.raises(OptionError) as caught:
        options.resolve(2.0, 40.0, 32)
    assert caught.value.key == key and fragment in str(caught.value)


def test_is_multiple() -> None:
    assert is_multiple(80, 40) and is_multiple(40, 40) and is_multiple(0.5, 0.25)
    assert not is_multiple(20, 40) and not is_multiple(60, 40)
    assert is_multiple(1.0000000001, 0.5)


NON_DEFAULT = {
    "output": [OutputFormat.MS, OutputFormat.BOTH],
    "avg_time_res_s": [4.0, 0.5],
    "avg_freq_res_khz": [80.0, 0.2],
    "flag_edge_width_khz": [0.0, 160.0],
    "no_rfi": [True],
    "no_geometric_delay": [True],
    "no_cable_delay": [True],
    "no_digital_gains": [True],
    "no_passband_gains": [True],
    "flag_dc": [True, False],
    "apply_di_cal": [True],
    "centre": [PhaseCentre.POINTING],
    "allow_missing": [True],
}


def test_the_table_covers_every_option() -> None:
    names = {spec.name for spec in fields(ConversionOptions)}
    assert names - set(NON_DEFAULT) == {"phase_centre_ra_deg", "phase_centre_dec_deg"}


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in NON_DEFAULT.items() for value in values]
)
def test_every_option_survives_to_params_and_back(name: str, value: object) -> None:
    # The pipeline rebuilds a job's options from the params stored at submission.
    options = ConversionOptions(**{name: value})  # type: ignore[arg-type]
    params = options.to_params()
    assert ConversionOptions.from_params(params) == options
    # As the database gives them back (JSON strings), and as mwa_client sends them.
    assert ConversionOptions.from_params({k: str(v) for k, v in params.items()}) == options


def test_all_options_at_once_and_a_custom_centre_survive_to_params_and_back() -> None:
    options = ConversionOptions(
        **{name: values[0] for name, values in NON_DEFAULT.items() if name != "centre"},  # type: ignore[arg-type]
        centre=PhaseCentre.CUSTOM, phase_centre_ra_deg=278.5, phase_centre_dec_deg=-3.25,
    )  # fmt: skip
    assert ConversionOptions.from_params(options.to_params()) == options


@pytest.mark.parametrize(
    ("params", "flag_dc"),
    [
        ({"flagdcchannels": "true"}, True),
        ({"flagdcchannels": "false"}, False),
        ({"flag_dc": "true"}, True),
        ({"flag_dc": "false"}, False),
        ({"no_flag_dc": "true"}, False),
        ({"no_flag_dc": "false"}, None),
    ],
)
def test_dc_flagging_keys(params: dict[str, str], flag_dc: bool | None) -> None:
    options = ConversionOptions.from_params(params)
    assert options.flag_dc is flag_dc
    assert ConversionOptions.from_params(options.to_params()).flag_dc is flag_dc


@pytest.mark.parametrize(
    ("text", "ra_deg", "dec_deg"),
    [
        # cotter's -centre form; the mwa_client CSV reader removes the space.
        ("18h33m41.89s -03d39m04.25s", 278.42454, -3.65118),
        ("18h33m41.89s-03d39m04.25s", 278.42454, -3.65118),
        ("18h33m41.89s03d39m04.25s", 278.42454, 3.65118),
        ("18:33:41.89 -03:39:04.25", 278.42454, -3.65118),
        ("278.42 -3.65", 278.42, -3.65),
        ("278.42-3.65", 278.42, -3.65),
        ("0 +89.5", 0.0, 89.5),
    ],
)
def test_legacy_phasecentre_is_a_custom_centre(text: str, ra_deg: float, dec_deg: float) -> None:
    for key in ("phasecentre", "centre_custom"):
        options = ConversionOptions.from_params({key: text})
        assert options.centre == PhaseCentre.CUSTOM
        assert options.phase_centre_ra_deg == pytest.approx(ra_deg, abs=1e-5)
        assert options.phase_centre_dec_deg == pytest.approx(dec_deg, abs=1e-5)
        assert ConversionOptions.from_params(options.to_params()) == options


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"phasecentre": "true"}, "expected 'RA Dec'"),
        ({"phasecentre": "10.527.0"}, "expected 'RA Dec'"),  # spaces removed: ambiguous
        ({"centre_custom": "25h00m00s -10d00m00s"}, "RA must be in 0..24 h"),
        ({"phasecentre": "10 -95"}, "Dec in -90..90"),
        # A typo, not 13:40:39 or 19h15m: it phased the data to a wrong position, silently.
        ({"phasecentre": "12:99:99 5"}, "minutes and seconds must be below 60"),
        ({"phasecentre": "18h75m00s -03d39m04s"}, "minutes and seconds must be below 60"),
        ({"phasecentre": "18h33m41s -03d39m60s"}, "minutes and seconds must be below 60"),
        ({"phasecentre": "10 -9", "phase_centre_ra": "10"}, "not both"),
        ({"phasecentre": "10 -9", "centre": "pointing"}, "contradicts the other phase-centre"),
        ({"phasecentre": "10 -9", "usepcentre": "true"}, "contradicts the other phase-centre"),
    ],
)
def test_bad_phasecentre_is_refused(params: dict[str, str], fragment: str) -> None:
    with pytest.raises(OptionError, match=fragment):
        ConversionOptions.from_params(params)


@pytest.mark.parametrize(
    ("params", "key", "given"),
    [
        # Was stored as centre=pointing without a word.
        ({"centre": "phase", "usepcentre": "true"}, "usepcentre", "centre=phase, usepcentre=true"),
        # Was refused as "centre='pointing' is not valid: phase_centre_ra/dec need centre=custom",
        # naming keys the request did not have.
        ({"usepcentre": "true", "phasecentre": "278.42 -3.65"}, "phasecentre",
         "usepcentre=true, phasecentre=278.42 -3.65"),
        ({"centre_pointing": "true", "phase_centre_ra": "10", "phase_centre_dec": "1"},
         "phase_centre_ra", "centre_pointing=true, phase_centre_ra=10, phase_centre_dec=1"),
        ({"centre": "custom", "usepcentre": "true", "phasecentre": "10 -9"}, "usepcentre",
         "centre=custom, usepcentre=true, phasecentre=10 -9"),
    ],
)  # fmt: skip
def test_contradictory_phase_centres_are_refused_naming_the_keys_written(
    params: dict[str, str], key: str, given: str
) -> None:
    with pytest.raises(OptionError) as caught:
        ConversionOptions.from_params(params)
    assert caught.value.key == key
    assert str(caught.value) == (
        f"{key}={params[key]!r} is not valid: contradicts the other phase-centre options "
        f"({given}); give one"
    )


@pytest.mark.parametrize(
    ("params", "centre"),
    [
        ({"centre": "pointing", "usepcentre": "true"}, PhaseCentre.POINTING),
        ({"centre": "phase", "usepcentre": "false"}, PhaseCentre.PHASE),  # false asks for nothing
        ({"usepcentre": "false", "phasecentre": "10 -9"}, PhaseCentre.CUSTOM),
        ({"centre": "custom", "phasecentre": "10 -9"}, PhaseCentre.CUSTOM),
        ({"centre": "", "usepcentre": "true"}, PhaseCentre.POINTING),
    ],
)
def test_phase_centre_options_that_agree_are_accepted(
    params: dict[str, str], centre: PhaseCentre
) -> None:
    assert ConversionOptions.from_params(params).centre == centre


def test_cotter_era_switches_are_honoured_or_refused() -> None:
    """nogeom and nosbgains are today's switches; the others are what we always do."""
    options = ConversionOptions.from_params({"nogeom": "true", "nosbgains": "true"})
    assert options.no_geometric_delay and options.no_digital_gains
    assert (
        options.to_params()
        == ConversionOptions.from_params(
            {"no_geometric_delay": "true", "no_digital_gains": "true"}
        ).to_params()
    )
    for key in ("noflagautos", "noantennapruning", "nostats"):
        assert ConversionOptions.from_params({key: "true"}) == ConversionOptions()
        with pytest.raises(OptionError, match=rf"{key}='false' is not valid: not offered"):
            ConversionOptions.from_params({key: "false"})
    with pytest.raises(OptionError, match="missing coarse channels are always flagged"):
        ConversionOptions.from_params({"noflagmissings": "true"})


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"timeres": "16", "avg_time_res": "8"}, "contradicts timeres=16"),
        ({"conversion": "ms", "output": "uvfits"}, "contradicts conversion=ms"),
        ({"nogeom": "true", "no_geometric_delay": "false"}, "contradicts nogeom=true"),
    ],
)
def test_an_option_given_under_two_names_must_agree(params: dict[str, str], fragment: str) -> None:
    with pytest.raises(OptionError, match=fragment):
        ConversionOptions.from_params(params)
    agreeing = {key: next(iter(params.values())) for key in params}
    ConversionOptions.from_params(agreeing)


def test_one_value_spelled_two_ways_under_two_names_agrees() -> None:
    options = ConversionOptions.from_params({"timeres": "16", "avg_time_res": "16.0"})
    assert options.avg_time_res_s == 16.0
    assert ConversionOptions.from_params(
        {"nogeom": "TRUE", "no_geometric_delay": "true"}
    ).no_geometric_delay
