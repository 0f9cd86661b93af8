"""An offline catalogue of the standard MWA calibrators and common named targets.

Positions are J2000 (ICRS) degrees. Calibrator flux densities at 150 MHz and
spectral indices are approximate literature values (mostly 1.4 GHz flux
densities of the Perley-Butler / Baars scales extrapolated with their spectral
index), good to tens of percent: enough to choose and simulate calibrators, not
to calibrate a flux scale. Names match case-insensitively, ignoring spaces,
dashes and underscores ("Pictor A", "pica", "3C 444").
"""

from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
from astropy.coordinates import SkyCoord

from observatory.core.offline import allow_internet


class UnknownSourceError(KeyError):
    """A source name that is not in the catalogue (and could not be resolved)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Source:
    """A named sky position, with a power-law spectrum for calibrators."""

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy_150mhz: float | None = None
    spectral_index: float | None = None
    is_calibrator: bool = False
    aliases: tuple[str, ...] = ()

    def skycoord(self) -> SkyCoord:
        """The position as an ICRS SkyCoord."""
        return SkyCoord(self.ra_deg * u.deg, self.dec_deg * u.deg, frame="icrs")

    def flux_jy(self, freq_mhz: float) -> float:
        """Flux density at ``freq_mhz``: S150 (f/150)^alpha.

        Raises
        ------
        ValueError
            If the source has no spectrum in the catalogue.
        """
        if self.flux_jy_150mhz is None or self.spectral_index is None:
            raise ValueError(f"source {self.name} has no flux density in the catalogue")
        return self.flux_jy_150mhz * (freq_mhz / 150.0) ** self.spectral_index


_SOURCES = (
    # Calibrators
    Source("3C444", 333.6071, -17.0266, 60.0, -0.9, True, ("3C 444", "PKS2211-17")),
    # No 3C name: at Dec -45.8 it is south of the 3C survey (3C 143 is another source).
    Source("PicA", 79.9572, -45.7788, 440.0, -0.85, True, ("Pictor A", "PKS0518-45")),
    Source("HydA", 139.5236, -12.0956, 320.0, -0.9, True, ("Hydra A", "3C218", "3C 218")),
    Source("HerA", 252.7838, 4.9926, 420.0, -1.0, True, ("Hercules A", "3C348", "3C 348")),
    Source("VirA", 187.7059, 12.3911, 1100.0, -0.8, True, ("Virgo A", "M87", "3C274", "3C 274")),
    Source("CenA", 201.3651, -43.0191, 2700.0, -0.7, True, ("Centaurus A", "NGC5128")),
    Source("3C161", 96.7921, -5.8843, 91.0, -0.7, True, ("3C 161",)),
    Source("3C33", 17.2203, 13.3372, 69.0, -0.75, True, ("3C 33",)),
    Source("3C98", 59.7268, 10.4341, 63.0, -0.8, True, ("3C 98",)),
    Source("3C353", 260.1173, -0.9793, 272.0, -0.7, True, ("3C 353",)),
    Source("3C409", 303.6150, 23.5814, 53.0, -0.6, True, ("3C 409",)),
    Source("PKS2356-61", 359.7680, -60.9165, 90.0, -0.8, True, ("PKS 2356-61",)),
    # Fornax A (NGC 1316) at 03h22m41.7s -37d12m30s. 750 Jy at 154 MHz, measured with the
    # MWA (McKinley et al. 2015, MNRAS 446, 3478), spectral index -0.825 as the A-team sky
    # models built on that measurement take it: 765 Jy at 150 MHz. Its lobes span about a
    # degree, which the MWA's own calibration models resolve; here, as every entry, it is a
    # point of its integrated flux, which is what the simulator writes and the solver fits,
    # so it needs no rule of its own in the choice of calibrator (the MWA calibrates on it).
    Source("ForA", 50.6738, -37.2083, 765.0, -0.825, True, ("Fornax A", "NGC1316", "PKS0320-37")),
    # At 21h57m05.98s -69d41m23.7s; GLEAM J215706-694117 (Hurley-Walker et al. 2017), one
    # of the few extragalactic GLEAM sources above 87 Jy at 154 MHz: 131 Jy at 145 MHz with
    # spectral index -0.56 in MWA calibrator tables, 129 Jy at 150 MHz. "PKS2153-69" is the
    # MWA's name for it (its B1950 position, 21h52m58s -69d55m41s, rounded); the Parkes
    # catalogue's is PKS 2152-699.
    Source("PKS2153-69", 329.2749, -69.6899, 129.0, -0.56, True, ("PKS2152-69", "PKS2152-699")),
    # Named targets (positions only)
    Source("TauA", 83.6331, 22.0145, aliases=("Crab", "Crab Nebula", "M1", "3C144")),
    Source("CasA", 350.8664, 58.8117, aliases=("Cassiopeia A", "3C461")),
    Source("CygA", 299.8682, 40.7339, aliases=("Cygnus A", "3C405")),
    Source("SgrA*", 266.4168, -29.0078, aliases=("SgrA", "Galactic Centre", "Galactic Center")),
    Source("LMC", 80.8942, -69.7561, aliases=("Large Magellanic Cloud",)),
    Source("SMC", 13.1867, -72.8286, aliases=("Small Magellanic Cloud",)),
    Source("47Tuc", 6.0236, -72.0813, aliases=("47 Tucanae", "NGC104")),
    Source("Vela", 128.8358, -45.1764, aliases=("Vela pulsar", "PSRJ0835-4510", "PSR B0833-45")),
    Source("J0437-4715", 69.3166, -47.2525, aliases=("PSRJ0437-4715",)),
    Source("EoR0", 0.0, -27.0, aliases=("EoR field 0",)),
    Source("EoR1", 60.0, -30.0, aliases=("EoR field 1",)),
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " -_")


_BY_KEY = {_key(alias): source for source in _SOURCES for alias in (source.name, *source.aliases)}


def lookup(name: str) -> Source:
    """The catalogue entry for ``name`` or one of its aliases.

    Raises
    ------
    UnknownSourceError
        Naming the name that is not in the catalogue.
    """
    source = _BY_KEY.get(_key(name))
    if source is None:
        raise UnknownSourceError(f"source {name!r} is not in the catalogue")
    return source


def calibrators() -> list[Source]:
    """The standard calibrators."""
    return [source for source in _SOURCES if source.is_calibrator]


def all_sources() -> list[Source]:
    """Every catalogue entry."""
    return list(_SOURCES)


def resolve(name: str, allow_online: bool | None = None) -> Source:
    """``lookup(name)``, falling back to astropy's name resolver only when online is allowed.

    Raises
    ------
    UnknownSourceError
        If the name is not in the catalogue and cannot (or may not) be resolved.
    """
    try:
        return lookup(name)
    except UnknownSourceError:
        if not (allow_internet() if allow_online is None else allow_online):
            raise
    try:
        coord = SkyCoord.from_name(name)
    except Exception as exc:  # the resolver raises NameResolveError or network errors
        raise UnknownSourceError(
            f"source {name!r} is not in the catalogue and did not resolve ({exc})"
        ) from exc
    return Source(name, float(coord.icrs.ra.deg), float(coord.icrs.dec.deg))
