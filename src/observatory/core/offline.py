"""Keep astropy from reaching for the internet.

HPC nodes and CI have no network. astropy downloads two things on demand: IERS
tables (for UT1 and polar motion) and the observatory site registry
(``EarthLocation.of_site``, which pyuvdata calls for every telescope name). We
turn the first off and seed the second into astropy's own download cache
through its public API, so ``EarthLocation.of_site("mwa")`` works offline.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

from astropy.utils import data as astropy_data
from astropy.utils import iers

_SITES_JSON = "coordinates/sites.json"


def allow_internet() -> bool:
    """Whether the installation may go online (``OBSERVATORY_ALLOW_INTERNET=1``)."""
    return os.environ.get("OBSERVATORY_ALLOW_INTERNET", "").lower() in {"1", "true", "yes"}


def _in_cache(url: str) -> bool:
    """Whether astropy's download cache holds ``url``; quietly False on a machine that has
    no cache yet (astropy 8 warns of it; seeding the cache makes it)."""
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
    Idempotent and cheap after the first call. If astropy's cache already holds
    a site registry (for example the full one, downloaded on a machine that was
    online once) it is kept as it is.
    """
    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    if not allow_internet():
        astropy_data.conf.allow_internet = False
    urls = [astropy_data.conf.dataurl + _SITES_JSON, astropy_data.conf.dataurl_mirror + _SITES_JSON]
    if all(_in_cache(url) for url in urls):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(dict(sites), handle)
        seeded_path = handle.name
    try:
        for url in urls:
            if not _in_cache(url):
                astropy_data.import_file_to_cache(url, seeded_path, remove_original=False)
    finally:
        os.unlink(seeded_path)
