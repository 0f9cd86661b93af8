import pytest
from astropy.coordinates import SkyCoord

from observatory.telescope.catalogue import UnknownSourceError, calibrators, lookup, resolve


@pytest.mark.parametrize(
    ("name", "expected"),
    [("PicA", "PicA"), ("Pictor A", "PicA"), ("pic a", "PicA"), ("3C 444", "3C444"), ("hyda", "HydA"),
     ("M87", "VirA"), ("Crab", "TauA"), ("3c-348", "HerA")],
)  # fmt: skip
def test_lookup_and_aliases(name: str, expected: str) -> None:
    assert lookup(name).name == expected


def test_positions_are_icrs_degrees() -> None:
    source = lookup("3C444")
    coord = source.skycoord()
    # 3C444 is at 22h14m25.75s -17d01m36s.
    assert coord.separation(SkyCoord("22h14m25.75s", "-17d01m36s")).arcsec < 10


def test_flux_power_law() -> None:
    hyda = lookup("HydA")
    assert hyda.flux_jy(150) == pytest.approx(hyda.flux_jy_150mhz)
    assert hyda.flux_jy(300) == pytest.approx(hyda.flux_jy_150mhz * 2**hyda.spectral_index)
    with pytest.raises(ValueError, match="no flux density"):
        lookup("EoR0").flux_jy(150)


def test_calibrators() -> None:
    names = {s.name for s in calibrators()}
    assert {"3C444", "PicA", "HydA", "HerA", "VirA", "CenA", "3C161"} <= names
    assert all(
        s.flux_jy_150mhz and s.flux_jy_150mhz > 0 and s.spectral_index for s in calibrators()
    )


def test_unknown_name() -> None:
    with pytest.raises(UnknownSourceError, match="'Nowhere X' is not in the catalogue"):
        lookup("Nowhere X")


def test_resolve_never_goes_online_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object, **_kwargs: object) -> SkyCoord:
        raise AssertionError("went online")

    monkeypatch.setattr(SkyCoord, "from_name", forbidden)
    monkeypatch.delenv("OBSERVATORY_ALLOW_INTERNET", raising=False)
    assert resolve("PicA").name == "PicA"
    with pytest.raises(UnknownSourceError):
        resolve("M31")


def test_resolve_online_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SkyCoord, "from_name", lambda name: SkyCoord(10.68, 41.27, unit="deg"))
    source = resolve("M31", allow_online=True)
    assert (source.name, round(source.ra_deg, 2), round(source.dec_deg, 2)) == ("M31", 10.68, 41.27)
