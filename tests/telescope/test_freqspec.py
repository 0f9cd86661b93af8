import pytest

from observatory.telescope.freqspec import (
    FreqspecError,
    coarse_channel_centre_mhz,
    format_freqspec,
    parse_freqspec,
    parse_freqspecs,
)


def test_documented_examples() -> None:
    assert parse_freqspec("121,24") == list(range(109, 133))
    # The worked picket-fence example of the triggering documentation.
    assert parse_freqspec("121,24,3") == [109, 112, 115, 118, 121, 124, 127, 130, *range(131, 147)]
    assert parse_freqspec("101:112;141:152") == [*range(101, 113), *range(141, 153)]
    singles = ";".join(str(c) for c in range(60, 84))
    assert parse_freqspec(singles) == list(range(60, 84))


def test_metafits_centchan_convention() -> None:
    # CENTCHAN 143 -> channels 131..154 and 145 -> 133..156 in real metafits.
    assert parse_freqspec("143,24") == list(range(131, 155))
    assert parse_freqspec("145,24") == list(range(133, 157))


@pytest.mark.parametrize("centre", range(12, 245))
def test_every_width_24_centre_round_trips(centre: int) -> None:
    channels = parse_freqspec(f"{centre},24")
    assert len(channels) == 24 and channels[0] == centre - 12
    assert format_freqspec(channels) == f"{centre},24"
    assert parse_freqspec(format_freqspec(channels)) == channels


def test_other_forms() -> None:
    assert parse_freqspec("57") == [57]
    assert parse_freqspec("100:110:5") == [100, 105, 110]
    assert parse_freqspec("100,3") == [99, 100, 101]
    assert parse_freqspec(" 62 ; 63 ;64") == [62, 63, 64]
    assert format_freqspec([62, 63, 64, 70, 80, 81]) == "62:64;70;80:81"
    assert parse_freqspec(format_freqspec([62, 63, 64, 70, 80, 81])) == [62, 63, 64, 70, 80, 81]
    assert coarse_channel_centre_mhz(100) == pytest.approx(128.0)


def test_lists() -> None:
    assert parse_freqspecs("121,24") == [list(range(109, 133))]
    assert parse_freqspecs('["121,24", "145,24"]') == [list(range(109, 133)), list(range(133, 157))]
    assert parse_freqspecs(["57", "58"]) == [[57], [58]]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("121,x", "token 'x' is not an integer"),
        ("abc", "token 'abc' is not an integer"),
        ("300", "channel 300 is outside 0..255"),
        ("5,24", "channel -7 is outside"),
        ("121,25", "width 25 is more than 24"),
        ("121,0", "width '0' must be positive"),
        ("121,24,0", "increment '0' must be positive"),
        ("110:100", "starts after it stops"),
        ("100:110:0", "increment '0' must be positive"),
        ("1:2:3:4", "start:stop[:increment]"),
        ("1,2,3,4", "centre,width[,increment]"),
        ("100;100", "channel 100 is selected twice"),
        ("100;;101", "empty entry"),
        ("100:130", "selects 31 channels"),
        # Refused before the range is made: this one was gigabytes of channels, then a 500.
        ("1:99999999999999999", "channel 99999999999999999 is outside 0..255"),
        ("0:255", "range '0:255' selects 256 channels"),
        ("-5:3", "channel -5 is outside"),
        # More than one sign: int() refused these with a bare ValueError naming neither.
        ("--5", "freqspec '--5': token '--5' is not an integer"),
        ("1,--2", "freqspec '1,--2': token '--2' is not an integer"),
        ("5:--7", "freqspec '5:--7': token '--7' is not an integer"),
        ("-", "token '-' is not an integer"),
    ],
)
def test_errors_name_the_problem(spec: str, fragment: str) -> None:
    with pytest.raises(FreqspecError) as caught:
        parse_freqspec(spec)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('["121,24"', "not valid JSON"),
        ("[1, 2]", "list of strings"),
        ("[]", "empty list"),
        ('["121,x"]', "'x'"),
    ],
)
def test_list_errors(value: str, fragment: str) -> None:
    with pytest.raises(FreqspecError) as caught:
        parse_freqspecs(value)
    assert fragment in str(caught.value)
