"""Settings, read from the environment (``OBSERVATORY_*``) or a TOML file.

The TOML file is named by ``OBSERVATORY_CONFIG``; its keys are the setting names
without the prefix, in lower case (``data_dir = "/srv/obs"``). Environment
variables win over the file.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    """Configuration of one observatory-services installation."""

    model_config = SettingsConfigDict(env_prefix="OBSERVATORY_", extra="ignore")

    data_dir: Path = Field(default=Path("./observatory-data"))
    database_url: str | None = None
    dask_scheduler: str | None = None
    config: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("OBSERVATORY_CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(
                    f"OBSERVATORY_CONFIG names {toml_path}, which does not exist"
                )
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The database URL; by default a SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'observatory.sqlite3').resolve()}"

    @property
    def archive_dir(self) -> Path:
        """Where observation files live (one sub-directory per obsid)."""
        return self.data_dir / "archive"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()


def settings_from(**overrides: Any) -> Settings:
    """Settings with explicit overrides, for tests and the CLI."""
    return Settings(**overrides)
