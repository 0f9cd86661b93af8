"""astropy works offline, and the user's own astropy download cache is left as it was.

Each test runs Python in a subprocess whose home (and so astropy's cache) is a temporary
directory: astropy keeps the site registry it loaded for the rest of the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: Run first in every script: what astropy's download cache holds, for comparing.
SNAPSHOT = """
import hashlib, json, warnings
from astropy.utils import data as astropy_data

def snapshot():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", astropy_data.CacheMissingWarning)
        contents = astropy_data.cache_contents()
    return {url: hashlib.sha256(open(path, "rb").read()).hexdigest() for url, path in contents.items()}
"""

SITES_JSON = "coordinates/sites.json"

#: What an earlier version of the offline set-up wrote into the user's cache.
OLD_ONE_SITE_REGISTRY = {
    "mwa": {
        "name": "Murchison Widefield Array",
        "aliases": ["MWA", "mwa"],
        "source": "mwalib constants (MWA_LATITUDE_RADIANS, MWA_LONGITUDE_RADIANS, MWA_ALTITUDE_METRES)",
        "latitude": -26.703319405555554,
        "latitude_unit": "degree",
        "longitude": 116.67081523611111,
        "longitude_unit": "degree",
        "elevation": 377.827,
        "elevation_unit": "meter",
        "timezone": "Australia/Perth",
    }
}


def _site(name: str, aliases: list[str], lat: float, lon: float, h: float) -> dict[str, object]:
    return {
        "name": name, "aliases": aliases, "source": "a test",
        "latitude": lat, "latitude_unit": "degree", "longitude": lon, "longitude_unit": "degree",
        "elevation": h, "elevation_unit": "meter", "timezone": "UTC",
    }  # fmt: skip


VLA = _site("Karl G. Jansky Very Large Array", ["VLA"], 34.0784, -107.6184, 2124.0)
#: The MWA as a user's full registry might have it: a height of its own, to see whose wins.
USERS_MWA = _site("Murchison Widefield Array", ["MWA"], -26.703319, 116.67081, 377.0)


def _python(home: Path, *script: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run the parts of ``script`` with ``home`` as the home directory (no other astropy
    cache), after :data:`SNAPSHOT`."""
    env = {**os.environ, "HOME": str(home), **environ}
    for name in ("XDG_CACHE_HOME", "ASTROPY_CACHE_DIR", "OBSERVATORY_ALLOW_INTERNET"):
        if name not in environ:
            env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-W", "error::Warning:astropy.utils.data", "-c", "".join((SNAPSHOT, *script))],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _seed_users_cache(registry: Mapping[str, object], *, mirror_too: bool = False) -> str:
    """Script lines that put ``registry`` into the user's cache, as astropy would have."""
    return f"""
import os, pathlib
# In the test's home (a temporary directory of its own): one in /tmp was left behind.
registry_file = pathlib.Path(os.environ["HOME"]) / "sites-to-import.json"
registry_file.write_text(json.dumps({registry!r}))
urls = [astropy_data.conf.dataurl + "{SITES_JSON}"]
if {mirror_too!r}:
    urls.append(astropy_data.conf.dataurl_mirror + "{SITES_JSON}")
for url in urls:
    astropy_data.import_file_to_cache(url, str(registry_file))
registry_file.unlink()
before = snapshot()
"""


OURS = """
from observatory.telescope.site import ensure_astropy_offline
from observatory.core.offline import configure_astropy_offline
ensure_astropy_offline()
configure_astropy_offline({"mwa": {}})  # again: a no-op (this entry would not even load)
from astropy.coordinates import EarthLocation
print("mwa", round(EarthLocation.of_site("mwa").lat.deg, 3), round(EarthLocation.of_site("MWA").height.value, 3))
"""

#: After OURS, with a user's registry that has the VLA: it is used, and left as it was.
VLA_KEPT = """
print("vla", round(EarthLocation.of_site("vla").lat.deg, 3))
print("unchanged", snapshot() == before)
"""


def test_a_new_machine_finds_the_site_offline_without_a_warning(tmp_path: Path) -> None:
    """astropy 8 warned "CacheMissingWarning: .../download/url does not exist" when the
    offline set-up first looked in a cache not yet made; and the set-up wrote a one-site
    registry into the user's cache, which every astropy program of the user then read."""
    done = _python(tmp_path, OURS, "print('cache', snapshot())")
    assert "mwa -26.703 377.827" in done.stdout
    assert "cache {}" in done.stdout
    assert "CacheMissingWarning" not in done.stderr
    assert not any(tmp_path.rglob("contents")), "wrote into the user's astropy cache"


def test_plain_astropy_afterwards_is_unchanged(tmp_path: Path) -> None:
    """The reviewer's case: after an observatory run, plain astropy code of the same
    account (cache from XDG_CACHE_HOME) knew only the MWA and refused every other site."""
    cache_home = tmp_path / "xdg-cache"
    cache_home.mkdir()
    _python(tmp_path, OURS, XDG_CACHE_HOME=str(cache_home))
    plain = """
astropy_data.conf.allow_internet = False
from astropy.coordinates import EarthLocation
print("cached:", snapshot())
try:
    print("names:", EarthLocation.get_site_names())
except OSError:
    print("no registry: astropy would download it")
"""
    done = _python(tmp_path, plain, XDG_CACHE_HOME=str(cache_home))
    assert "cached: {}" in done.stdout
    assert "no registry: astropy would download it" in done.stdout, done.stdout
    assert not any(tmp_path.rglob("contents"))


def test_a_full_registry_in_the_users_cache_is_used_and_kept(tmp_path: Path) -> None:
    """The user's registry is read, not rewritten: its sites (and its MWA) are the ones used."""
    done = _python(tmp_path, _seed_users_cache({"vla": VLA, "mwa": USERS_MWA}), OURS, VLA_KEPT)
    assert "mwa -26.703 377.0" in done.stdout  # the user's entry wins
    assert "vla 34.078" in done.stdout
    assert "unchanged True" in done.stdout


def test_sites_the_users_registry_lacks_are_added_in_memory_only(tmp_path: Path) -> None:
    done = _python(tmp_path, _seed_users_cache({"vla": VLA}), OURS, VLA_KEPT)
    assert "mwa -26.703 377.827" in done.stdout
    assert "vla 34.078" in done.stdout
    assert "unchanged True" in done.stdout


def test_a_registry_an_older_version_left_is_kept_and_named(tmp_path: Path) -> None:
    """User data is not deleted; the warning says what it is and how to remove it."""
    seed = _seed_users_cache(OLD_ONE_SITE_REGISTRY, mirror_too=True)
    done = _python(tmp_path, seed, OURS, 'print("unchanged", snapshot() == before, len(before))')
    assert "mwa -26.703 377.827" in done.stdout
    assert "unchanged True 2" in done.stdout
    assert "left there by an older observatory-services" in done.stderr
    assert "clear_download_cache" in done.stderr


def test_a_registry_astropy_cannot_read_is_left_and_ours_used(tmp_path: Path) -> None:
    seed = _seed_users_cache({"vla": {"name": "VLA", "aliases": []}})  # no position
    done = _python(tmp_path, seed, OURS, 'print("unchanged", snapshot() == before)')
    assert "mwa -26.703 377.827" in done.stdout
    assert "unchanged True" in done.stdout
    assert "cached site registry is unusable" in done.stderr


def test_never_downloads_even_when_the_internet_is_allowed(tmp_path: Path) -> None:
    """The registry comes from memory even with OBSERVATORY_ALLOW_INTERNET=1 (a node that
    may go online but cannot would wait on the timeout), and pyuvdata finds the MWA."""
    refuse = """
import urllib.request

def refuse(*args, **kwargs):
    raise AssertionError("tried to download")

urllib.request.OpenerDirector.open = refuse
"""
    pyuvdata = """
from pyuvdata import Telescope
print("pyuvdata", round(Telescope.from_known_telescopes("mwa").location.lat.deg, 3))
print("cache", snapshot())
"""
    done = _python(tmp_path, refuse, OURS, pyuvdata, OBSERVATORY_ALLOW_INTERNET="1")
    assert "pyuvdata -26.703" in done.stdout
    assert "cache {}" in done.stdout
    assert not any(tmp_path.rglob("contents"))


def test_the_old_registry_fixture_is_what_the_site_module_gives() -> None:
    """The stale-registry test above stands for what older versions wrote: the MWA entry."""
    from observatory.telescope.site import _MWA_SITE_ENTRY

    assert json.loads(json.dumps({"mwa": _MWA_SITE_ENTRY})) == OLD_ONE_SITE_REGISTRY
