"""Settings, read from the environment (``OBSERVATORY_*``) or a TOML file.

The TOML file is named by ``OBSERVATORY_CONFIG``; its keys are the setting names
without the prefix, in lower case (``data_dir = "/srv/obs"``). Environment
variables win over the file.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL


class ConfigFileError(ValueError):
    """The file named by ``OBSERVATORY_CONFIG`` (or an ``OBSERVATORY_*`` variable) cannot be
    read as settings."""


class DataDirectoryMissing(FileNotFoundError):
    """The data directory is not there (a shared file system not mounted): what needs it,
    the signing key first, waits for it rather than making a new one on the local disk."""


#: Signing keys read from data directories, by path.
_KEY_CACHE: dict[Path, bytes] = {}


def _check_known_settings(path: str, document: dict[str, Any], known: set[str]) -> None:
    """A misspelled key in the config file would be ignored, and its default used without
    a word: refuse it, naming the nearest setting."""
    unknown = sorted(set(document) - known)
    if not unknown:
        return
    nearest = difflib.get_close_matches(unknown[0], sorted(known), n=1)
    hint = f" (did you mean {nearest[0]}?)" if nearest else ""
    if f"OBSERVATORY_{unknown[0].upper()}" in OTHER_VARIABLES:
        hint = f" (OBSERVATORY_{unknown[0].upper()} is read from the environment only)"
    raise ConfigFileError(
        f"config file {path} (OBSERVATORY_CONFIG): unknown setting {', '.join(unknown)}{hint}; "
        "keys are the settings' names without the OBSERVATORY_ prefix, in lower case"
    )


#: ``OBSERVATORY_*`` variables that are not settings: the config file's name, the parent
#: of a service's command and its memory and CPU share (``core.processes``), the trigger and calibration clients' URLs, whether astropy
#: may go online (read before any settings, when astropy is configured), and the test
#: suite's and benchmarks' own.
OTHER_VARIABLES = frozenset(
    {"OBSERVATORY_CONFIG", "OBSERVATORY_PARENT_PID", "OBSERVATORY_CALIB_URL",
     "OBSERVATORY_MEMORY_LIMIT_BYTES", "OBSERVATORY_CPU_SHARE", "OBSERVATORY_TRIGGER_URL",
     "OBSERVATORY_ALLOW_INTERNET", "OBSERVATORY_SHARED_DATA"}
)  # fmt: skip
OTHER_VARIABLE_PREFIXES = ("OBSERVATORY_TEST_", "OBSERVATORY_REQUIRE_", "OBSERVATORY_BENCH_")


def _check_known_variables(environ: Mapping[str, str], known: set[str]) -> None:
    """A misspelled ``OBSERVATORY_*`` variable would be ignored, and the default used
    without a word (``OBSERVATORY_DATA_DRI``): refuse it, naming the nearest setting."""
    unknown = sorted(
        name
        for name in environ
        if name.startswith("OBSERVATORY_")
        and name not in OTHER_VARIABLES
        and not name.startswith(OTHER_VARIABLE_PREFIXES)
        and name.removeprefix("OBSERVATORY_").lower() not in known
    )
    if not unknown:
        return
    names = sorted(f"OBSERVATORY_{setting.upper()}" for setting in known)
    nearest = difflib.get_close_matches(unknown[0], names, n=1)
    hint = f" (did you mean {nearest[0]}?)" if nearest else ""
    raise ConfigFileError(
        f"environment variable {', '.join(unknown)} names no setting{hint}; a setting's "
        "variable is OBSERVATORY_ and its name in capitals (docs/deploy.md, Settings and "
        "secrets): unset it, or correct its name"
    )


#: The shortest signing key taken (``OBSERVATORY_SECRET_KEY`` or the data directory's file).
MIN_SECRET_KEY_CHARS = 16


class Settings(BaseSettings):
    """Configuration of one observatory-services installation."""

    model_config = SettingsConfigDict(env_prefix="OBSERVATORY_", extra="ignore")

    data_dir: Path = Field(default=Path("./observatory-data"))
    database_url: str | None = None
    dask_scheduler: str | None = None
    #: Key that signs cookies and download URLs; by default a random key kept in the data dir.
    secret_key: str | None = None
    #: Log lines of ``observatory serve``: uvicorn's ``text``, or ``json`` (one object per
    #: line, with request ids; see docs/deploy.md).
    log_format: Literal["text", "json"] = "text"
    #: Oldest client accepted at ASVO login, by the prefix of its version string.
    asvo_min_client_versions: dict[str, str] = Field(
        default_factory=lambda: {"mantaray-clientv": "1.2", "giant-squidv": "2.0.0"}
    )

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_is_given(cls, value: object) -> object:
        # An empty OBSERVATORY_DATA_DIR meant the current directory: the database and keys
        # landed beside whatever was there, with no word of it.
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: give a directory (the default is ./observatory-data)")
        return value

    @field_validator("calib_callback_hosts", mode="before")
    @classmethod
    def _hosts_from_text(cls, value: object) -> object:
        # From the environment: a JSON list, or names separated by commas. A shell sourcing
        # an env file strips the JSON's quotes ("[a.example]"), which failed every command.
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            with contextlib.suppress(ValueError):
                return json.loads(text)
            text = text.removeprefix("[").removesuffix("]")
        return [host.strip().strip("\"'") for host in text.split(",") if host.strip()]

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_long_enough(cls, key: str | None) -> str | None:
        if not key:
            return None  # empty: a key made in the data directory
        if len(key) < MIN_SECRET_KEY_CHARS:
            raise ValueError(
                f"under {MIN_SECRET_KEY_CHARS} characters: too easily guessed to sign sessions"
            )
        return key

    @field_validator("asvo_min_client_versions")
    @classmethod
    def _client_versions_are_numbers(cls, minimums: dict[str, str]) -> dict[str, str]:
        # Refused at start: a minimum that cannot be compared failed every login.
        for prefix, version in minimums.items():
            if prefix not in ("mantaray-clientv", "giant-squidv"):
                raise ValueError(
                    f"unknown client {prefix!r}: the clients are mantaray-clientv and giant-squidv"
                )
            if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})*", version):
                raise ValueError(
                    f"{prefix}: {version!r} is not a version of numbers and dots (2.5.0)"
                )
        return minimums

    #: ``none``, ``partial`` (no acacia delivery) or ``full`` (no submissions): the real messages.
    #: Anything else is refused at start (a typo must not mean "no outage").
    asvo_outage: Literal["none", "partial", "full"] = "none"
    #: Jobs a user may have queued or running at once.
    asvo_max_active_jobs: int = Field(default=100, ge=1)
    #: Days a product stays downloadable.
    asvo_product_ttl_days: float = Field(default=7.0, gt=0, le=36_500, allow_inf_nan=False)
    #: Shared file systems for ``scratch`` and ``dug`` delivery (default: inside the data dir);
    #: products land in ``<root>/<group>/asvo/<job_id>``.
    asvo_scratch_root: Path | None = None
    asvo_dug_root: Path | None = None
    #: Triggered targets must be at least this high at each observation's midpoint.
    trigger_min_elevation_deg: float = Field(default=0.0, ge=-90, le=90)
    #: Automatically chosen calibrators: at least this high, this far from a risen Sun.
    trigger_calibrator_min_elevation_deg: float = Field(default=30.0, ge=-90, le=90)
    trigger_sun_exclusion_deg: float = Field(default=20.0, ge=0, le=180)
    #: ``avoidsun``: the Sun's zenith-normalised beam power must fall below this.
    trigger_sun_threshold: float = Field(default=1e-3, ge=0, allow_inf_nan=False)
    #: Voltage capture: disk for VCS data, and its rate per coarse channel (128 tiles,
    #: 2 polarisations, 1.28 Msample/s of 8+8-bit samples).
    trigger_vcs_capacity_bytes: float = Field(default=200e12, ge=0, allow_inf_nan=False)
    trigger_vcs_bytes_per_s_per_chan: float = Field(default=655.36e6, gt=0, allow_inf_nan=False)
    #: How much of the past the MWAX voltage buffer holds (triggerbuffer), seconds.
    trigger_buffer_s: int = Field(default=240, ge=0)
    #: Hosts that calibration callbacks may be sent to (empty: any host); never URLs with
    #: credentials, only http(s).
    calib_callback_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Callback delivery: attempts before giving up, first retry delay (doubling), seconds.
    calib_callback_attempts: int = Field(default=8, ge=1)
    calib_callback_backoff_s: float = Field(default=30.0, ge=0, le=86_400, allow_inf_nan=False)
    #: The simulated telescope of ``observatory serve``: it records each scheduled
    #: correlator observation once it has ended, with this many tiles, no finer than this.
    telescope_runner: bool = True
    telescope_tiles: int = Field(default=16, ge=1, le=256)
    telescope_min_fine_chan_khz: float = Field(default=40.0, gt=0, allow_inf_nan=False)
    telescope_min_int_time_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    #: Voltage captures: tiles recorded, and the largest capture recorded at all (bytes).
    telescope_vcs_tiles: int = Field(default=1, ge=1, le=256)
    telescope_max_voltage_bytes: int = Field(default=4 * 2**30, ge=0)

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
        _check_known_variables(os.environ, set(settings_cls.model_fields))
        toml_path = os.environ.get("OBSERVATORY_CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(
                    f"OBSERVATORY_CONFIG names {toml_path}, which "
                    + (
                        "is a directory, not a file"
                        if Path(toml_path).is_dir()
                        else "does not exist"
                    )
                )
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
                document = tomllib.loads(Path(toml_path).read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigFileError(
                    f"config file {toml_path} (OBSERVATORY_CONFIG) is not valid TOML: {exc}"
                ) from None
            except UnicodeDecodeError as exc:
                raise ConfigFileError(
                    f"config file {toml_path} (OBSERVATORY_CONFIG) is not UTF-8 text "
                    f"(byte {exc.start}); TOML files are UTF-8"
                ) from None
            _check_known_settings(toml_path, document, set(settings_cls.model_fields))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The database URL; by default a SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        # Made, not pasted: a '?' or '%' in the path would be read as the URL's own.
        database = str((self.data_dir / "observatory.sqlite3").resolve())
        return URL.create("sqlite", database=database).render_as_string(hide_password=False)

    def secret_key_bytes(self) -> bytes:
        """The signing key: ``secret_key``, else a random one created once in the data dir.

        Read from disk once per process (every request checks a cookie with it).
        """
        if self.secret_key:
            return self.secret_key.encode()
        path = (self.data_dir / "secret_key").resolve()
        if path not in _KEY_CACHE:
            _KEY_CACHE[path] = self._read_or_create_key(path)
        return _KEY_CACHE[path]

    @staticmethod
    def _read_or_create_key(path: Path) -> bytes:
        """The key in ``path``, made first if there is none.

        Written whole under another name, then linked to ``path`` (which fails if another
        process linked its key first: both then read that one). Created in place, another
        process starting at the same moment read the empty file before the key was in it,
        and signed with an empty key for its whole life.

        Raises
        ------
        DataDirectoryMissing
            When the directory that holds ``path`` is not there: it is never made here.
        ValueError
            When the file holds no key (emptied by hand): anyone could sign with it.
        """
        if not path.parent.is_dir():
            # Never made here: on a web worker whose share is not mounted, a new directory
            # with a new random key made /readyz say ready while this worker signed sessions
            # and download links with another key than the others. ``demo`` makes the data
            # directory, and so does the migration of the default SQLite database.
            raise DataDirectoryMissing(
                f"data directory {path.parent} does not exist (is the shared file system "
                "mounted?): the signing key is kept there; /readyz reports not ready until "
                "it does"
            )
        if not path.exists():
            draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_urlsafe(48))
                    handle.flush()
                    os.fsync(handle.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(draft, path)
            finally:
                draft.unlink()
        key = path.read_text().strip().encode()
        if len(key) < MIN_SECRET_KEY_CHARS:
            raise ValueError(
                f"{path} holds no signing key (or one under {MIN_SECRET_KEY_CHARS} "
                "characters): remove it to have a new one made (sessions and links signed "
                "with the old one end), or set OBSERVATORY_SECRET_KEY"
            )
        return key

    @property
    def calib_dir(self) -> Path:
        """Calibration solution files (one sub-directory per fit)."""
        return self.data_dir / "calib"

    @property
    def products_dir(self) -> Path:
        """Where ASVO products (tars for acacia delivery) are kept until they expire."""
        return self.data_dir / "products"

    @property
    def work_dir(self) -> Path:
        """Scratch space of running jobs (one sub-directory per job)."""
        return self.data_dir / "work"

    def delivery_root(self, delivery: str) -> Path:
        """The shared file system of a ``scratch`` or ``dug`` delivery, as an absolute path.

        Absolute because get_jobs reports the product's path to clients, which run in
        other directories (a relative data dir is relative to the server's).
        """
        configured = {"scratch": self.asvo_scratch_root, "dug": self.asvo_dug_root}[delivery]
        root = configured if configured is not None else self.data_dir / delivery
        return root.expanduser().absolute()

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
