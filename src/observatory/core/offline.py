"""Keep astropy from reaching for the internet, without changing the user's astropy set-up.

HPC nodes and CI have no network. astropy downloads two things on demand: IERS
tables (for UT1 and polar motion) and the observatory site registry
(``EarthLocation.of_site``, which pyuvdata calls for every telescope name: its own
table has no location for the MWA). We turn the first off, and give this process's
site registry the sites we need, in memory only.

The user's astropy download cache (``~/.cache/astropy``, or ``~/.astropy/cache``) is
shared by everything astropy does in that account, so we only ever read it: a
registry written there would be the one every other astropy program of the user
sees (astropy looks in its cache before going online).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from astropy.coordinates import EarthLocation
from astropy.utils import data as astropy_data
from astropy.utils import iers

log = logging.getLogger(__name__)

_SITES_JSON = "coordinates/sites.json"

#: Site ids this process's astropy registry holds through us (see configure_astropy_offline).
_registered: frozenset[str] = frozenset()
_registering = threading.Lock()


def allow_internet() -> bool:
    """Whether the installation may go online (``OBSERVATORY_ALLOW_INTERNET=1``)."""
    return os.environ.get("OBSERVATORY_ALLOW_INTERNET", "").lower() in {"1", "true", "yes"}


def _sites_url() -> str:
    """The URL astropy keeps its site registry under in its download cache."""
    return str(astropy_data.conf.dataurl) + _SITES_JSON


def _in_cache(url: str) -> bool:
    """Whether astropy's download cache holds ``url``; quietly False on a machine that has
    no cache yet (astropy 8 warns of it; only reading, we make none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", astropy_data.CacheMissingWarning)
        return bool(astropy_data.is_url_in_cache(url))


def configure_astropy_offline(sites: Mapping[str, Mapping[str, Any]]) -> None:
    """Switch astropy to offline operation and make ``sites`` known to ``of_site``.

    Parameters
    ----------
    sites
        Entries in astropy's ``sites.json`` layout (name, aliases, latitude,
        longitude, elevation and their units), keyed by site id.

    Notes
    -----
    Idempotent, and cheap after the first call in a process; it never goes online.

    The registry ``EarthLocation.of_site`` uses in this process (astropy keeps it in
    memory once loaded) becomes the one in the user's astropy download cache, if there
    is one (the full registry, downloaded once online), with those of ``sites`` added
    that it does not name. Nothing is written to the user's cache: the registry is read
    from a private, temporary astropy cache that is deleted at once, so other astropy
    programs of the user, which read the user's cache, see no change. Another process
    must call this again (``observatory.telescope.site.ensure_astropy_offline``).

    Earlier versions of this function wrote a registry holding only ``sites`` (the
    MWA) into the user's cache, under astropy's URL and its mirror's, which then hid
    astropy's full registry from every astropy program of the user, online too. Such a
    file is in the user's cache, which we do not delete from: it is left as it is and
    used like any cached registry, and a warning says how to remove it
    (``astropy.utils.data.clear_download_cache`` of both URLs), after which astropy
    downloads its full registry the next time it is online.
    """
    global _registered
    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    if not allow_internet():
        astropy_data.conf.allow_internet = False
    with _registering:  # two threads would otherwise both swap astropy's cache directory
        if set(sites) <= _registered:
            return
        _register_sites(sites)
        _registered = _registered | set(sites)


def _register_sites(sites: Mapping[str, Mapping[str, Any]]) -> None:
    """Load the user's cached registry plus the missing ``sites`` into astropy's memory."""
    ours = json.loads(json.dumps(dict(sites)))  # plain dicts and lists, as a file gives them
    cached = _cached_registry()
    if cached is not None and _is_ours(cached, ours):
        log.warning(
            "astropy's download cache holds a site registry with only %s in it, left there "
            "by an older observatory-services; astropy programs of this account know no "
            "other sites until it is removed: python -c 'from astropy.utils import data; "
            'data.clear_download_cache("%s"); '
            'data.clear_download_cache(data.conf.dataurl_mirror + "%s")\'',
            ", ".join(sorted(ours)),
            _sites_url(),
            _SITES_JSON,
        )
    merged = _with_missing_sites(cached or {}, ours)
    try:
        names = _load_registry(merged)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # one astropy cannot read
        log.warning("astropy's cached site registry is unusable (%s); using our sites only", exc)
        names = _load_registry(ours)
    missing = sorted(site for site in ours if site.lower() not in {n.lower() for n in names})
    if missing:
        # Only when something loaded astropy's registry before we were called: astropy
        # keeps the first one it loaded, and replacing it means downloading.
        log.warning(
            "astropy's site registry was loaded before the offline set-up and lacks %s", missing
        )


def _cached_registry() -> dict[str, Any] | None:
    """The site registry in the user's astropy download cache (read only), if any."""
    url = _sites_url()
    if not _in_cache(url):  # checked first: download_file would make the cache directory
        return None
    try:
        # sources=[]: a cache hit or a KeyError, never a download (astropy's documented way).
        path = astropy_data.download_file(url, cache=True, sources=[])
        registry = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("astropy's cached site registry %s is unreadable (%s): not used", url, exc)
        return None
    return registry if isinstance(registry, dict) else None


def _is_ours(registry: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """Whether ``registry`` is one an older version of this module seeded: our entries only."""
    return bool(registry) and all(ours.get(site) == entry for site, entry in registry.items())


def _site_names(site: str, entry: Mapping[str, Any]) -> set[str]:
    """The names ``of_site`` finds an entry under, lower case (as astropy matches them)."""
    aliases = entry.get("aliases")
    names = [site, entry.get("name"), *(aliases if isinstance(aliases, list) else [])]
    return {name.lower() for name in names if isinstance(name, str) and name}


def _with_missing_sites(registry: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """``registry`` plus each of ``ours`` it has under none of its names (the user's wins)."""
    known: set[str] = set()
    for site, entry in registry.items():
        if isinstance(entry, Mapping):
            known |= _site_names(site, entry)
    merged = dict(registry)
    for site, entry in ours.items():
        if not _site_names(site, entry) & known:
            merged[site] = entry
    return merged


def _load_registry(registry: Mapping[str, Any]) -> list[str]:
    """Have astropy load ``registry`` as its site registry; returns the names it knows.

    astropy reads the registry from its download cache, so for the moment of the load
    its cache is a temporary directory of ours. Other threads' astropy downloads would
    use it for that moment too: this runs at start-up (once per process), before any.
    """
    with _private_astropy_cache() as cache_dir:
        source = cache_dir / "observatory-sites.json"
        source.write_text(json.dumps(registry), encoding="utf-8")
        astropy_data.import_file_to_cache(_sites_url(), str(source), remove_original=True)
        return list(EarthLocation.get_site_names())


@contextmanager
def _private_astropy_cache() -> Iterator[Path]:
    """A temporary astropy download cache for this process, deleted on leaving."""
    try:
        from astropy.config.paths import temporary_cache_dir_path  # astropy >= 8
    except ImportError:  # astropy 6 and 7: set_temp_cache (soft-deprecated in 8)
        from astropy.config import set_temp_cache

        with (
            tempfile.TemporaryDirectory(prefix="observatory-astropy-") as directory,
            set_temp_cache(directory),
        ):
            yield Path(directory)
        return
    with temporary_cache_dir_path(namespace="astropy", prefix="observatory-astropy-") as path:
        yield Path(path)
