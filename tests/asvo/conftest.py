"""What the ASVO tests share: an archive of the real MWA files, a voltage observation, users."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from observatory.archive.models import Observation
from observatory.archive.service import ingest_directory
from observatory.core.accounts import create_user
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.storage import Storage
from shared_data import MWA_DATA


@pytest.fixture
def seed_archive(settings: Settings) -> Callable[[int, Mapping[str, str]], Settings]:
    """Seeds ``settings``' database: the real MWA files, a voltage observation at
    ``vcs_obsid`` (only its schedule row, all the API needs) and users ``{name: api key}``."""

    def seed(vcs_obsid: int, api_keys: Mapping[str, str]) -> Settings:
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            ingest_directory(session, Storage(settings.archive_dir), MWA_DATA)
            session.add(
                Observation(
                    obsid=vcs_obsid, stoptime=vcs_obsid + 16, obsname="vcs_test", creator="test",
                    project_id="D0000", mode="MWAX_VCS", delays=[0] * 16, coarse_chans=[133, 134],
                )
            )  # fmt: skip
            for name, key in api_keys.items():
                create_user(session, name, key)
            session.commit()
        engine.dispose()
        return settings

    return seed
