"""Simulated observations written into the archive and registered there.

A simulation is written into a directory of its own (a hidden staging directory beside the
observation's, ``.<obsid>.staging-<host>-<pid>-<random>``), and its files are moved into
the observation's directory only once their rows are flushed (``ingest_directory`` with
``move_files``): two recordings of one observation at once (two job runners' telescopes)
never write over each other's files, and the one whose registration fails removes only the
files it moved into the archive itself, never those the other registered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from observatory.archive.models import Observation
from observatory.archive.service import (
    get_observation,
    ingest_directory,
    metafits_observation_fields,
)
from observatory.core.accounts import project_id_problem
from observatory.core.config import Settings
from observatory.core.storage import Storage, remove_leftover_temporaries, temporary_name
from observatory.telescope.catalogue import UnknownSourceError, lookup
from observatory.telescope.instrument import (
    MWAX_SUBOBS_S,
    N_TILES,
    VCS_BLOCKS_PER_SUBOBS,
    VCS_SAMPLES_PER_BLOCK,
    VCS_SUBFILE_HEADER_BYTES,
    subarray_tiles,
    sweet_grid_number,
    tile_layout,
    validate_coarse_chans,
)
from observatory.telescope.simulator import PointSource, SimulatedObservation, simulate_observation

log = logging.getLogger(__name__)

#: Scheduled modes recorded as voltages (MWAX_VCS sub-files).
VOLTAGE_MODES = frozenset({"MWAX_VCS", "VOLTAGE_BUFFER"})
#: Buffering voltages: recorded only where a buffer dump saved them (as MWAX_VCS sub-files).
BUFFER_MODE = "MWAX_BUFFER"
#: Brightness given to a triggered target (not in the catalogue), Jy at 150 MHz.
TARGET_FLUX_JY = 10.0


#: Seed of the simulated array's instrument (any fixed number): its tiles' gains and cable-delay
#: errors are the same in every observation it records.
INSTRUMENT_SEED = 1_480_000_000
#: Scatter of the tiles' gain amplitudes about 1 and of their cable-delay errors about 0.
GAIN_AMPLITUDE_SCATTER = 0.1
DELAY_ERROR_SCATTER_NS = 2.0


def instrument_gains(
    n_tiles: int, coarse_chans: Sequence[int], *, antennas: Sequence[int] | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The simulated array's gain amplitudes (n_tiles, 2, channels) and delay errors (n_tiles, 2), ns.

    The same for a tile and receiver channel in every observation, as a real array's are from
    one observation to the next: a calibrator's fit then calibrates the observations near it
    (each observation drew its own, so a target calibrated with its calibrator's solutions
    came out with the phases of two unrelated instruments).

    Parameters
    ----------
    n_tiles
        The first ``n_tiles`` tiles of the layout (``array_tiles(n_tiles=...)``).
    coarse_chans
        Receiver channels, in any order (the result is in ascending order, the simulator's).
    antennas
        Or these tiles: their indices in :func:`~observatory.telescope.instrument.tile_layout`
        (then ``n_tiles`` is ignored); the rows are in ascending order, which is the
        simulator's (the layout is sorted by tile id), so a tile has the same gains whichever
        tiles it is recorded with.
    """
    rng = np.random.default_rng(INSTRUMENT_SEED)
    amplitudes = np.abs(1.0 + GAIN_AMPLITUDE_SCATTER * rng.standard_normal((N_TILES, 2, 256)))
    delays_ns = DELAY_ERROR_SCATTER_NS * rng.standard_normal((N_TILES, 2))
    # In the simulator's order (ascending), with its errors for bad channel numbers.
    chans = np.asarray(validate_coarse_chans(coarse_chans), dtype=np.intp)
    if antennas is None:
        return amplitudes[:n_tiles][:, :, chans], delays_ns[:n_tiles]
    rows = np.asarray(sorted(antennas), dtype=np.intp)
    return amplitudes[rows][:, :, chans], delays_ns[rows]


def _calibrator_point_source(name: str, phase_centre: tuple[float, float] | None) -> PointSource:
    """The calibrator of a calibrator observation: its catalogue entry, else (a name a
    trigger resolved online, which the offline catalogue lacks) a point source at the
    observation's phase centre, where the trigger put the calibrator."""
    try:
        return catalogue_point_source(name)
    except UnknownSourceError:
        if phase_centre is None:
            raise
        log.info("calibrator %r is not in the catalogue: simulated at the phase centre", name)
        return PointSource(*phase_centre, TARGET_FLUX_JY, -0.8, name)


def catalogue_point_source(name: str) -> PointSource:
    """A catalogue source as a point source (its catalogue spectrum, or 1 Jy, alpha -0.8)."""
    entry = lookup(name)
    return PointSource(
        entry.ra_deg, entry.dec_deg, entry.flux_jy_150mhz or 1.0, entry.spectral_index or -0.8,
        entry.name,
    )  # fmt: skip


def _register(session: Session, settings: Settings, staged: Path) -> None:
    """Register what was simulated into the staging directory ``staged``, moving the files
    into the archive once their rows are flushed; log the files left unregistered (no one
    reads the report here)."""
    report = ingest_directory(session, Storage(settings.archive_dir), staged, move_files=True)
    for path, reason in report.skipped:
        log.warning("not registered: %s: %s", path, reason)


def _check_project_id(project_id: str) -> None:
    """Refuse, before anything is written, a project id the archive cannot register."""
    problem = project_id_problem(project_id)
    if problem:
        raise ValueError(problem)


def _remove_stale_parts(out_dir: Path, obsid: int) -> None:
    """Remove the hidden ``.<obsid>...part`` files a simulation of ``obsid`` killed while
    writing left behind: ingest skips dot-files, so nothing else ever removes them."""
    for part in out_dir.glob(f".{obsid}*.part"):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            log.info("removed %s, left by an interrupted simulation", part)


@contextlib.contextmanager
def _staging(settings: Settings, obsid: int) -> Iterator[Path]:
    """A new directory of this run's own to simulate ``obsid`` into; removed at the end
    (with whatever of the simulation was not moved into the archive).

    Beside ``<archive>/<obsid>``, hidden (ingest skips hidden directories), named as
    :func:`~observatory.core.storage.temporary_name` names temporaries: the staging
    directories of runs on this host that were killed are removed first.
    """
    target = settings.archive_dir / str(obsid)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftover_temporaries(target)
    staged = target.with_name(temporary_name(target.name, "staging") + secrets.token_hex(4))
    staged.mkdir()
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def _removed_unless_registered(
    simulated: SimulatedObservation, settings: Settings
) -> Iterator[None]:
    """If registering ``simulated`` fails, remove the files of it this run moved into the
    archive: left there unregistered, a later ingest of the directory would register them.

    Only those: a file is this run's if it is the very file it simulated (the same inode:
    a move keeps it), so a file of the same name another run wrote and registered is never
    removed (two telescopes recording one observation: the loser removed the winner's files,
    leaving catalogue rows without files). And no other run can have registered a file this
    run moved into place: its rows, flushed before the move, hold those names until this
    transaction ends, and the caller rolls back only after this.
    """
    ours = set()
    for written in simulated.files:
        status = written.path.stat()
        ours.add((status.st_dev, status.st_ino))
    try:
        yield
    except BaseException:
        for written in simulated.files:
            placed = settings.archive_dir / str(simulated.obsid) / written.path.name
            with contextlib.suppress(FileNotFoundError):
                status = os.stat(placed)
                if (status.st_dev, status.st_ino) in ours:
                    placed.unlink()
        raise


def simulate_and_register(
    session: Session,
    settings: Settings,
    *,
    obsid: int,
    sources: Sequence[PointSource],
    n_tiles: int = 8,
    coarse_chans: Sequence[int] = (133, 134),
    fine_chan_khz: float = 40.0,
    int_time_s: float = 2.0,
    n_timesteps: int = 4,
    calibrator: str | None = None,
    mode: str = "MWAX_CORRELATOR",
    project_id: str = "D0000",
    obsname: str | None = None,
    noise_sigma_jy: float = 1.0,
    seed: int = 0,
    flagged_antennas: Sequence[int] = (),
) -> Observation:
    """Simulate an observation into ``<archive>/<obsid>/`` and register it like an ingest.

    The telescope points at the first source. The array's per-tile gain amplitudes
    and cable-delay errors (:func:`instrument_gains`) are injected; ``seed`` draws the
    noise. The truth is archived beside the data as ``<obsid>_truth.json``.

    The simulation is written into a staging directory of its own and its files are moved
    into ``<archive>/<obsid>/`` once registered (flushed). If registering fails, the files
    simulated are removed again (nothing of the observation stays in the archive
    unregistered, and no file another run registered is touched); so are the hidden
    ``.part`` files an earlier simulation of ``obsid`` killed while writing left.

    Raises
    ------
    ValueError
        If the observation exists, ``project_id`` is not a valid project id (see
        :func:`~observatory.core.accounts.project_id_problem`), or the simulator refuses
        a parameter.
    """
    if session.get(Observation, obsid) is not None:
        raise ValueError(f"observation {obsid} already exists in the archive")
    _check_project_id(project_id)
    _remove_stale_parts(settings.archive_dir / str(obsid), obsid)
    amplitudes, delays_ns = instrument_gains(n_tiles, coarse_chans)
    with _staging(settings, obsid) as staged:
        simulated = simulate_observation(
            staged,
            obsid,
            n_tiles=n_tiles,
            coarse_chans=coarse_chans,
            fine_chan_khz=fine_chan_khz,
            int_time_s=int_time_s,
            n_timesteps=n_timesteps,
            sources=sources,
            mode=mode,
            gain_amplitudes=amplitudes,
            delay_errors_ns=delays_ns,
            noise_sigma_jy=noise_sigma_jy,
            seed=seed,
            project_id=project_id,
            obs_name=obsname,
            calibrator=calibrator,
            flagged_antennas=flagged_antennas,
        )
        with _removed_unless_registered(simulated, settings):
            _register(session, settings, staged)
            observation = get_observation(session, obsid)
            observation.created_by = "simulator"
            session.flush()
    return observation


def _phase_centre(observation: Observation) -> tuple[float, float] | None:
    """Where the observation is phased: its phase centre, else its pointing (RA, Dec)."""
    ra = observation.ra_phase_deg if observation.ra_phase_deg is not None else observation.ra_deg
    dec = (
        observation.dec_phase_deg if observation.dec_phase_deg is not None else observation.dec_deg
    )
    return None if ra is None or dec is None else (ra, dec)


def observe_scheduled(
    session: Session,
    settings: Settings,
    observation: Observation,
    dumped_subobs_gps: Collection[int] | None = None,
) -> Observation:
    """Simulate a scheduled observation that has ended, into the archive, under its own obsid.

    The simulated telescope records ``settings.telescope_tiles`` tiles at no finer
    than ``telescope_min_fine_chan_khz`` and ``telescope_min_int_time_s`` (a real
    128-tile, 10 kHz, 0.5 s observation is tens of GB), and voltage captures
    (``MWAX_VCS``, ``VOLTAGE_BUFFER``) as MWAX_VCS sub-files of
    ``telescope_vcs_tiles`` tiles; the observation's record is updated to what was
    recorded, so it agrees with its metafits. The source is
    the calibrator of a calibrator observation, else a 10 Jy point source at the
    phase centre.

    An observation with subarrays records their tiles only, those tiles shared out equally
    among its subarrays (:func:`subarray_shares`; at least one each), each tile with its own
    subarray's delays (TILEDATA ``Delays``). The header (RA/DEC, AZIMUTH/ALTITUDE,
    RAPHASE/DECPHASE and ``DELAYS``) is the first subarray's pointing, and the record's
    ``subarray_pointings`` name the tiles recorded of each (``recorded_tile_ids``).

    A buffering observation (``MWAX_BUFFER``) keeps only what buffer dumps saved: its
    sub-files starting at ``dumped_subobs_gps`` (see :func:`dumped_subobs_gps`).

    The record's pointing and phase centre are set to the metafits' (an operator's
    observation is scheduled without them). As in :func:`simulate_and_register`, the
    recording is written into a staging directory of its own and moved into the archive
    once registered; if registering fails, the files this run moved there are removed again
    (never a file another recording of it registered); so are the hidden ``.part`` files an
    earlier, killed recording left.

    Raises
    ------
    ValueError
        If a dumped span is given for other than a buffering observation (or none for
        one), its project id is not valid (see
        :func:`~observatory.core.accounts.project_id_problem`), or the simulator
        refuses its parameters.
    """
    exposure_s = observation.stoptime - observation.obsid
    buffered = observation.mode == BUFFER_MODE
    if buffered != (dumped_subobs_gps is not None):
        raise ValueError(
            f"observation {observation.obsid} ({observation.mode}): a dumped span is needed "
            "for, and only for, a buffering observation"
        )
    voltages = observation.mode in VOLTAGE_MODES or buffered
    int_time_s = max(observation.int_time_s or 0.0, settings.telescope_min_int_time_s)
    fine_chan_khz = max(observation.freq_res_khz or 0.0, settings.telescope_min_fine_chan_khz)
    n_tiles = settings.telescope_vcs_tiles if voltages else settings.telescope_tiles
    _check_project_id(observation.project_id)
    phase_centre = _phase_centre(observation)
    if observation.calibration and observation.calibrator_source:
        sources = [_calibrator_point_source(observation.calibrator_source, phase_centre)]
    elif phase_centre is None:
        sources = []
    else:
        sources = [PointSource(*phase_centre, TARGET_FLUX_JY, -0.8, "target")]
    _remove_stale_parts(settings.archive_dir / str(observation.obsid), observation.obsid)
    subarrays = observation.subarray_pointings or []
    shares = subarray_shares(subarrays, n_tiles)
    antennas = _recorded_antennas(shares) if subarrays else None
    if antennas is not None:
        n_tiles = len(antennas)
    amplitudes, delays_ns = instrument_gains(n_tiles, observation.coarse_chans, antennas=antennas)
    pointing = None if observation.ra_deg is None else (observation.ra_deg, observation.dec_deg)
    layout = tile_layout()
    with _staging(settings, observation.obsid) as staged:
        simulated = simulate_observation(
            staged,
            observation.obsid,
            n_tiles=n_tiles,
            tile_ids=None if antennas is None else [layout[a].tile_id for a in antennas],
            coarse_chans=observation.coarse_chans,
            fine_chan_khz=fine_chan_khz,
            int_time_s=int_time_s,
            # Correlator: integrations; voltages: 8-s sub-files.
            n_timesteps=max(1, int(exposure_s // (MWAX_SUBOBS_S if voltages else int_time_s))),
            sources=sources,
            pointing_radec_deg=pointing,  # type: ignore[arg-type]
            phase_centre_radec_deg=phase_centre,
            mode="MWAX_VCS" if voltages else "MWAX_CORRELATOR",
            voltage_subobs_gps=dumped_subobs_gps,
            beamformer_delays=_scheduled_delays(observation, n_tiles, shares),
            # The header's pointing is the first subarray's throughout (RA/DEC, AZIMUTH/
            # ALTITUDE, RAPHASE/DECPHASE), its DELAYS too.
            header_delays=subarrays[0]["delays"] if subarrays else None,
            pointing_grid=_grid_point(observation),
            atten_db=observation.atten_db if observation.atten_db is not None else 1.0,
            gain_amplitudes=amplitudes,
            delay_errors_ns=delays_ns,
            noise_sigma_jy=1.0,
            seed=observation.obsid % 2**31,
            project_id=observation.project_id,
            obs_name=observation.obsname,
            creator=observation.creator or "simulator",
            calibrator=observation.calibrator_source if observation.calibration else None,
        )
        # Read before the files move into the archive.
        recorded = metafits_observation_fields(simulated.metafits_path)
        with _removed_unless_registered(simulated, settings):
            _register(session, settings, staged)
            observation.n_tiles = recorded["n_tiles"]
            if not voltages:
                observation.freq_res_khz = fine_chan_khz
                observation.int_time_s = int_time_s
            # Where the telescope pointed and phased, as the metafits says: an operator's
            # observation is scheduled without a position, and /metadata/obs and find showed
            # none for it once recorded.
            for column in RECORDED_POINTING_COLUMNS:
                setattr(observation, column, recorded[column])
            if subarrays:
                # A new list: SQLAlchemy sees a JSON column change only when it is assigned.
                observation.subarray_pointings = [
                    {**entry, "recorded_tile_ids": [layout[a].tile_id for a in share]}
                    for entry, share in zip(subarrays, shares, strict=True)
                ]
            session.flush()
    return observation


#: The columns of a recorded observation's record set to what its metafits says.
RECORDED_POINTING_COLUMNS = (
    "ra_deg", "dec_deg", "ra_phase_deg", "dec_phase_deg", "az_deg", "el_deg", "delays",
)  # fmt: skip


def subarray_shares(pointings: Sequence[Mapping[str, Any]], n_tiles: int) -> list[tuple[int, ...]]:
    """The tiles the simulated telescope records of each subarray of an observation.

    Parameters
    ----------
    pointings
        The observation's ``subarray_pointings`` (each names its ``subarray``).
    n_tiles
        How many tiles the telescope records: shared out equally (the first subarrays
        take what does not divide), at least one each, so every subarray's target has data.

    Returns
    -------
    list of tuple of int
        For each pointing, the first tiles of its subarray in layout order
        (:func:`~observatory.telescope.instrument.tile_layout` indices; at most the
        subarray's size), none of an earlier pointing's.

    Raises
    ------
    ValueError
        Naming a subarray that is not one of
        :func:`~observatory.telescope.instrument.subarray_tiles`.
    """
    members = subarray_tiles()
    taken: set[int] = set()
    shares = []
    for index, entry in enumerate(pointings):
        name = entry.get("subarray")
        if name not in members:
            raise ValueError(
                f"subarray {name!r} is not one of {', '.join(members)}: its tiles are unknown"
            )
        share = max(1, n_tiles // len(pointings) + (index < n_tiles % len(pointings)))
        chosen = tuple([a for a in members[name] if a not in taken][:share])
        taken.update(chosen)
        shares.append(chosen)
    return shares


def _grid_point(observation: Observation) -> tuple[str, int]:
    """The metafits ``GRIDNAME`` and ``GRIDNUM`` of a scheduled observation: the ``sweet``
    grid point its delays are (as the MWA's metafits name it), else the simulator's none."""
    if observation.subarray_pointings or len(observation.delays or ()) != 16:
        return ("sim", 0)
    number = sweet_grid_number(observation.delays)
    return ("sim", 0) if number is None else ("sweet", number)


def _scheduled_delays(
    observation: Observation, n_tiles: int, shares: Sequence[Sequence[int]]
) -> NDArray[np.int64] | None:
    """The dipole delays the recorded tiles were set to, one row per antenna (the
    simulator's order: by tile id): the schedule's pointing (a sweet spot, all-sky's
    single dipole), or with subarrays each tile's subarray's (``shares``: the tiles recorded
    of each, :func:`subarray_shares`). None when the record has no delays (the simulator
    points at the RA/Dec then)."""
    if observation.subarray_pointings:
        rows = {
            antenna: pointing["delays"]
            for pointing, share in zip(observation.subarray_pointings, shares, strict=True)
            for antenna in share
        }
        return np.array([rows[antenna] for antenna in sorted(rows)], dtype=np.int64)
    if len(observation.delays or ()) == 16:
        return np.broadcast_to(np.asarray(observation.delays, dtype=np.int64), (n_tiles, 16))
    return None


def dumped_subobs_gps(
    observation: Observation, spans_gps: Sequence[tuple[float, float]]
) -> list[int]:
    """The 8 s sub-files (their start, GPS s) of ``observation`` that overlap any of the
    spans buffer dumps saved of it (only those: between two dumps the buffer kept nothing)."""
    starts = np.arange(observation.obsid, observation.stoptime, MWAX_SUBOBS_S)
    kept = np.zeros(len(starts), dtype=bool)
    for start, end in spans_gps:
        kept |= (starts < end) & (starts + MWAX_SUBOBS_S > start)
    return [int(s) for s in starts[kept]]


def _recorded_antennas(shares: Sequence[tuple[int, ...]]) -> list[int]:
    """The tiles of all subarrays' shares (tile_layout() indices, ascending: the
    simulator's order)."""
    return sorted(a for share in shares for a in share)


def voltage_bytes(
    observation: Observation, n_tiles: int, subobs_gps: Collection[int] | None = None
) -> int:
    """Bytes of MWAX_VCS sub-files recording ``observation`` (or only its sub-files
    starting at ``subobs_gps``) with ``n_tiles`` tiles (or, with subarrays, the tiles
    :func:`subarray_shares` gives them: at least one each)."""
    if observation.subarray_pointings:
        n_tiles = len(_recorded_antennas(subarray_shares(observation.subarray_pointings, n_tiles)))
    whole = max(1, (observation.stoptime - observation.obsid) // MWAX_SUBOBS_S)
    n_subfiles = whole if subobs_gps is None else len(subobs_gps)
    # Two inputs per tile, 8-bit real + 8-bit imaginary samples.
    per_subfile = (
        VCS_SUBFILE_HEADER_BYTES + VCS_BLOCKS_PER_SUBOBS * 2 * n_tiles * VCS_SAMPLES_PER_BLOCK * 2
    )
    return int(n_subfiles * len(observation.coarse_chans or [0]) * per_subfile)
