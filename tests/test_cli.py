"""The observatory command, end to end in a temporary data directory."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from observatory.archive.models import Observation
from observatory.cli import build_parser, main
from observatory.core.accounts import authenticate_api_key, check_project_key
from observatory.core.config import Settings
from observatory.core.database import make_engine, make_session_factory
from observatory.core.gpstime import now_gps
from observatory.core.models import Project, User
from shared_data import MWA_DATA


def _run(data_dir: Path, *args: str) -> int:
    return main(["--data-dir", str(data_dir), *args])


def _sessions(data_dir: Path):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(Settings(data_dir=data_dir).resolved_database_url))


def test_console_script_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "observatory"
    result = subprocess.run(
        [str(script), "--data-dir", str(tmp_path / "d"), "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert (tmp_path / "d" / "observatory.sqlite3").is_file()


def test_db_upgrade_says_from_which_revision_to_which_it_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a fresh database it said only "... is up to date", as if nothing had been done."""
    from observatory.core.migrate import head_revision

    head = head_revision()
    assert _run(tmp_path / "d", "db", "upgrade") == 0
    assert f"migrated from revision none (empty) to {head}" in capsys.readouterr().out
    assert _run(tmp_path / "d", "db", "upgrade") == 0
    out = capsys.readouterr().out
    assert f"is up to date (at revision {head})" in out and "migrated" not in out


def test_db_upgrade_makes_the_data_directory_for_a_database_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PostgreSQL nothing made it (serving does not, on purpose): every sign-in of a
    new installation was a 503 until the operator made it by hand."""
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    data = tmp_path / "data"
    assert _run(data, "db", "upgrade") == 0
    assert data.is_dir() and f"made the data directory {data}" in capsys.readouterr().out
    # Not below a missing mount point: that is said, and nothing is made.
    unmounted = tmp_path / "mnt" / "observatory"
    assert _run(unmounted, "db", "upgrade") == 2
    assert "(is the shared file system mounted?)" in capsys.readouterr().err
    assert not unmounted.parent.exists()


def test_users_and_projects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    # Listing where there is no installation (a mistyped path, the wrong directory) makes none.
    assert _run(data, "projects", "list") == 2
    assert (
        f"no installation at {data} (from --data-dir): nothing to read" in capsys.readouterr().err
    )
    assert not data.exists()
    config = tmp_path / "observatory.toml"
    config.write_text(f'data_dir = "{data}"\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OBSERVATORY_CONFIG", str(config))
        patch.delenv("OBSERVATORY_DATA_DIR", raising=False)
        assert main(["projects", "list"]) == 2
    assert f"no installation at {data} (from data_dir in {config})" in capsys.readouterr().err
    assert _run(data, "users", "create", "alice") == 0
    first = capsys.readouterr()
    key = re.search(r"^API key: (\S+)$", first.out, re.M)
    assert key is not None
    assert f"no installation at {data} (from --data-dir): making a new, empty one" in first.err
    assert _run(data, "users", "create", "bob", "--api-key", "bobs-key-123") == 0
    later = capsys.readouterr()
    assert "API key: bobs-key-123" in later.out and "no installation" not in later.err
    with _sessions(data)() as session:
        assert authenticate_api_key(session, key.group(1)).name == "alice"
        assert authenticate_api_key(session, "bobs-key-123").name == "bob"
    assert _run(data, "users", "create", "alice") == 2
    assert "already exists" in capsys.readouterr().err

    assert (
        _run(data, "projects", "create", "G0055", "--priority", "3", "--secure-key", "k3y-G0055")
        == 0
    )
    assert "secured by a key" in capsys.readouterr().out
    with _sessions(data)() as session:
        project = session.get(Project, "G0055")
        assert project is not None and project.priority == 3
        assert project.secure_key_hash is not None and "k3y" not in project.secure_key_hash
    assert _run(data, "projects", "create", "bad id", "--priority", "1") == 2
    assert "project id" in capsys.readouterr().err

    # Keys can be given, rotated and taken away after creation; projects can be listed.
    assert _run(data, "projects", "create", "G0056", "--priority", "1") == 0
    assert _run(data, "projects", "set-key", "G0056") == 0
    new_key = re.search(r"^secure key: (\S+)$", capsys.readouterr().out, re.M)
    assert new_key is not None
    assert _run(data, "projects", "set-key", "G0055", "--secure-key", "rotated-key-55") == 0
    assert _run(data, "projects", "set-key", "G0099") == 2
    assert "no project 'G0099'" in capsys.readouterr().err
    with _sessions(data)() as session:
        for project_id, key, old in (
            ("G0056", new_key.group(1), None),
            ("G0055", "rotated-key-55", "k3y-G0055"),
        ):
            project = session.get(Project, project_id)
            assert project is not None and check_project_key(project, key)
            assert old is None or not check_project_key(project, old)
    assert _run(data, "projects", "set-key", "G0056", "--remove") == 0
    capsys.readouterr()
    # An empty key was taken as none: set-key made a random one, create a project that
    # cannot trigger, both without a word.
    for command in (("set-key", "G0056"), ("create", "G0057", "--priority", "1")):
        with pytest.raises(SystemExit) as refused:
            _run(data, "projects", *command, "--secure-key", " ")
        assert refused.value.code == 2 and "an empty key" in capsys.readouterr().err
    assert _run(data, "projects", "list") == 0
    listed = capsys.readouterr().out
    assert re.search(r"^G0055\tpriority 3\tkey set", listed, re.M), listed
    assert re.search(r"^G0056\tpriority 1\tno key: cannot trigger", listed, re.M), listed


def test_archive_ingest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert _run(data, "archive", "ingest", str(MWA_DATA)) == 0
    captured = capsys.readouterr()
    assert "ingested 3 new observation(s), 10 new file(s)" in captured.out
    assert "mwalib only accepts" in captured.err
    assert _run(data, "archive", "ingest", str(MWA_DATA)) == 0
    assert (
        "0 new observation(s), 0 new file(s); 10 file(s) already archived"
        in capsys.readouterr().out
    )
    with _sessions(data)() as session:
        assert len(session.scalars(select(Observation)).all()) == 3
    assert (data / "archive" / "1320409688" / "1320409688.metafits").is_file()


def test_archive_ingest_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(MWA_DATA / "1061315448.metafits", incoming)
    (incoming / "1061315448_20130823175130_gpubox07_01.fits").write_bytes(b"truncated")
    assert _run(tmp_path / "data", "archive", "ingest", str(incoming)) == 2
    err = capsys.readouterr().err
    assert "1061315448_20130823175130_gpubox07_01.fits" in err
    assert "nothing was ingested" in err
    assert not (tmp_path / "data" / "archive" / "1061315448").exists()


def test_users_create_has_no_admin_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing grants or checks administrator rights, so no option pretends to set them."""
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as caught:
        _run(data, "users", "create", "carol", "--admin")
    assert caught.value.code == 2
    assert "unrecognized arguments: --admin" in capsys.readouterr().err
    assert _run(data, "users", "create", "carol", "--email", "carol@example.org") == 0
    with _sessions(data)() as session:
        user = session.scalar(select(User).where(User.name == "carol"))
        assert user is not None and user.email == "carol@example.org"


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _run(tmp_path, "simulate", "observation", "--obsid", "abc")
    assert caught.value.code == 2
    # "cannot convert float NaN to integer" came from inside the simulation.
    for option, value in (("--int-time", "nan"), ("--int-time", "-2"), ("--fine-chan-khz", "inf")):
        with pytest.raises(SystemExit) as caught:
            _run(tmp_path, "simulate", "observation", "--obsid", "1320409688", option, value)
        assert caught.value.code == 2
        assert f"{option}: {value} is not a finite number above 0" in capsys.readouterr().err


def test_simulate_observation_registers_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    args = ["simulate", "observation", "--obsid", "1320409696", "--tiles", "4", "--coarse-chans", "133,134",
            "--fine-chan-khz", "160", "--timesteps", "2", "--source", "333.607,-17.027,60,-0.9,3C444",
            "--calibrator", "3C444"]  # fmt: skip
    assert _run(data, *args) == 0
    assert "simulated observation 1320409696" in capsys.readouterr().out
    with _sessions(data)() as session:
        observation = session.get(Observation, 1320409696)
        assert observation is not None
        assert observation.created_by == "simulator"
        assert observation.calibration and observation.calibrator_source == "3C444"
        assert observation.coarse_chans == [133, 134] and observation.n_tiles == 4
        kinds = sorted(f.kind for f in observation.files)
        assert kinds == ["metafits", "mwax_vis", "mwax_vis", "sim_truth"]
    assert _run(data, *args) == 2
    assert "already exists" in capsys.readouterr().err
    # One observation at a time, on 8-second boundaries (both were accepted).
    assert _run(data, "simulate", "observation", "--obsid", "1320409688", "--timesteps", "8") == 2
    assert "would overlap observation 1320409696" in capsys.readouterr().err
    assert _run(data, "simulate", "observation", "--obsid", "1320409690") == 2
    assert "1320409690 is not a multiple of 8" in capsys.readouterr().err
    # Not one that has not happened yet: the archive would list it as upcoming, with data.
    later = (now_gps() // 8 + 100) * 8
    assert _run(data, "simulate", "observation", "--obsid", str(later)) == 2
    assert re.search(
        rf"observation {later} would end at \d+, in the future", capsys.readouterr().err
    )
    # Once projects are registered, an unknown one is refused, as schedule refuses it (it
    # was recorded).
    assert _run(data, "projects", "create", "G0001", "--priority", "1") == 0
    capsys.readouterr()
    assert _run(data, "simulate", "observation", "--obsid", "1320409000", "--project", "NOPE") == 2
    assert "project_id 'NOPE' is not a known project" in capsys.readouterr().err
    # An operator schedules a buffering observation from now on (for triggerbuffer).
    buffering = ["schedule", "observation", "--duration", "600", "--mode", "MWAX_BUFFER",
                 "--project", "G0001"]  # fmt: skip
    assert _run(data, *buffering) == 0
    assert re.search(
        r"^scheduled \d{10} mwax_buffer_\d{10} \(MWAX_BUFFER\)", capsys.readouterr().out, re.M
    )
    assert _run(data, *buffering) == 2
    assert "overlaps observation" in capsys.readouterr().err
    assert (
        _run(
            data,
            "simulate",
            "observation",
            "--obsid",
            "1320409704",
            "--fine-chan-khz",
            "33",
            "--project",
            "G0001",
        )
        == 2
    )
    assert "33" in capsys.readouterr().err


def test_demo_seeds_and_serves(tmp_path: Path) -> None:
    import time

    import httpx

    from servers import free_port

    port = free_port()
    script = Path(sys.executable).parent / "observatory"
    process = subprocess.Popen(
        [str(script), "--data-dir", str(tmp_path / "demo"), "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    printed: list[str] = []
    try:
        assert process.stdout is not None
        while not printed or not printed[-1].startswith("API key:"):  # printed before serving
            line = process.stdout.readline()
            assert line, "the demo ended before printing its keys: " + "".join(printed)
            printed.append(line)
        password = next(t.split(":", 1)[1].strip() for t in printed if "portal password:" in t)
        deadline = time.monotonic() + 90
        healthy = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    healthy = True
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert healthy, "the demo did not answer /healthz within 90 s"
        found = httpx.get(f"http://127.0.0.1:{port}/metadata/find", timeout=10).json()
        assert len(found) == 5
        assert sum(o["calibration"] for o in found) == 2
        assert all(o["obsname"].startswith("demo_") for o in found)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=True) as portal:
            token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', portal.get("/login").text)
            assert token is not None
            form = {"username": "demo", "password": password, "csrf_token": token.group(1)}
            jobs = portal.post("/login", data=form)
            assert (
                jobs.status_code == 200 and "Your jobs" in jobs.text
            )  # the printed password works
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    output = "".join(printed) + output
    assert re.search(r"^API key: \S+$", output, re.M), output
    assert f"http://127.0.0.1:{port}/healthz" in output
    assert "no installation" not in output  # making one is what the demo is for
    # Run again: the observations are kept, and said to be (users copy obsids from here).
    again = subprocess.run(
        [str(script), "--data-dir", str(tmp_path / "demo"), "demo", "--no-serve"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert len(re.findall(r"^kept \d{10} demo_", again.stdout, re.M)) == 5, again.stdout


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_serve_and_demo_log_in_the_configured_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The demo serves as serve does: it ignored OBSERVATORY_LOG_FORMAT."""
    from observatory import cli

    formats: list[str] = []
    monkeypatch.setattr(
        cli, "_run_server", lambda app, args, *, log_format: formats.append(log_format)
    )
    monkeypatch.setenv("OBSERVATORY_LOG_FORMAT", "json")
    from servers import free_port

    # A free port: the demo checks it can listen before seeding (8000 may be taken here).
    assert _run(tmp_path / "data", command, "--port", str(free_port())) == 0
    assert formats == ["json"]


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_demo_on_a_port_in_use_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second demo on a taken port re-seeded first (a new API key, password and project
    key: the running demo's stopped working), then failed to listen (exit 3)."""
    import socket

    from servers import free_port

    data = tmp_path / "demo"
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert _run(data, "demo", "--port", str(port)) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "already in use" in err.lower()
        assert "nothing was seeded or changed" in err and "Traceback" not in err
        assert not data.exists()
        # With a demo there already: its credentials and files stay as they were.
        assert _run(data, "demo", "--no-serve") == 0
        key = re.search(r"^API key: (\S+)$", capsys.readouterr().out, re.M)
        assert key is not None
        before = _files(data)
        assert _run(data, "demo", "--port", str(port)) == 2
        assert f"127.0.0.1:{port}" in capsys.readouterr().err
        assert _files(data) == before
    with _sessions(data)() as session:
        assert authenticate_api_key(session, key.group(1)).name == "demo"
    # A host that is not this machine's is refused the same way, naming it.
    assert _run(data, "demo", "--host", "192.0.2.1", "--port", str(port)) == 2
    assert f"cannot listen on 192.0.2.1:{port}" in capsys.readouterr().err


def test_demo_over_https_prints_https_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The banner's URLs are the ones served; a certificate without its key seeds nothing."""
    data = tmp_path / "demo"
    assert _run(data, "demo", "--no-serve", "--ssl-certfile", "cert.pem") == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err
    assert not data.exists()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for certificate, says in (("missing.pem", "--ssl-certfile missing.pem: no such file"),
                              (str(tmp_path / "junk.pem"), "not a PEM certificate and its private key")):  # fmt: skip
        assert _run(data, "demo", "--no-serve", "--ssl-certfile", certificate,
                    "--ssl-keyfile", str(tmp_path / "junk.pem")) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert not data.exists()
    from servers import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    tls = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    assert _run(data, "demo", "--no-serve", "--port", "8443", *tls) == 0
    printed = capsys.readouterr().out
    assert "https://127.0.0.1:8443/healthz" in printed and "http://" not in printed


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command of ``parser`` (a path of subcommand names) with its parser."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


def test_the_readme_lists_every_command_and_option() -> None:
    """README.md's command list agrees with every ``observatory ... --help``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The `observatory` command") : readme.index("## HTTP")]
    for path, parser in _commands(build_parser()):
        command = " ".join(("observatory", *path))
        assert re.search(rf"^{re.escape(command)}\b", section, re.M), command
        options = [
            option
            for action in parser._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help"
        ]
        missing = [option for option in options if option not in section]
        assert not missing, f"{command}: {missing} not in README.md"
    assert "--data-dir" in section


def test_bad_input_to_the_command_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of these gave a traceback, or did something else than asked, without a word."""
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as caught:  # it listened on port 70000 - 65536 = 4464
        _run(data, "serve", "--port", "70000")
    assert (
        caught.value.code == 2 and "70000 is out of range (1 .. 65535)" in capsys.readouterr().err
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert _run(a_file, "users", "create", "alice") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for name in ("bob\n", "G1\n"):  # a trailing line break passed, and no one could use them
        command = (
            ["users", "create"]
            if name.startswith("b")
            else ["projects", "create", "--priority", "1"]
        )
        assert _run(data, *command, name) == 2
        assert "must be 1-" in capsys.readouterr().err
    assert _run(data, "users", "create", "alice", "--api-key", "sharedkey123") == 0
    assert _run(data, "users", "create", "bob", "--api-key", "sharedkey123") == 2
    assert "that API key is another user's" in capsys.readouterr().err
    with _sessions(data)() as session:
        assert authenticate_api_key(session, "sharedkey123").name == "alice"
        assert session.scalar(select(User).where(User.name == "bob")) is None


def test_the_data_directory_is_where_its_database_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A '?' or '%' in the data directory's path ended up in the database URL as the URL's
    own: the database went to another file, outside the data directory."""
    for name in ("a?b", "e%41f"):
        data = tmp_path / name
        assert _run(data, "users", "create", "alice") == 0
        assert (data / "observatory.sqlite3").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?b", "e%41f"]
    monkeypatch.setenv("OBSERVATORY_DATA_DIR", "")  # was the current directory
    with pytest.raises(ValidationError, match="empty: give a directory"):
        Settings()
    monkeypatch.setenv("OBSERVATORY_DATA_DIR", str(tmp_path / "x"))
    monkeypatch.setenv("OBSERVATORY_BENCH_POSTGRES_URL", "postgresql+psycopg://b/c")
    assert Settings().data_dir == tmp_path / "x"  # a benchmark's variable is no setting


def test_a_command_with_a_database_elsewhere_does_not_claim_to_make_a_new_installation(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    migrated_db_url: str,
) -> None:
    """It said "making a new, empty one", made no directory, and put the user into the
    database OBSERVATORY_DATABASE_URL names, which was neither new nor empty."""
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    missing = tmp_path / "missing"
    assert _run(missing, "users", "create", "dave") == 0
    err = capsys.readouterr().err
    assert f"no installation at {missing} (from --data-dir); the database is " in err
    assert "making a new" not in err and "password" not in err.split("database is ")[1]


def test_with_json_logging_every_line_a_server_writes_at_start_is_json(tmp_path: Path) -> None:
    """The missing-data-directory warning was a plain line among the JSON ones (``| jq``
    stopped at it). The server then fails to start on a taken port, after its warning."""
    import json
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "OBSERVATORY_LOG_FORMAT": "json",
               "OBSERVATORY_DATABASE_URL": f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"}  # fmt: skip
        finished = subprocess.run(
            [sys.executable, "-m", "observatory.cli", "--data-dir", str(tmp_path / "unmounted"),
             "serve", "--no-telescope", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 3 and lines, finished.stderr
    records = [json.loads(line) for line in lines]  # each line is one JSON object
    assert any("does not exist (is the shared file system" in r["message"] for r in records)


def test_serve_says_once_what_it_finds_of_a_missing_data_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    migrated_db_url: str,
) -> None:
    """With SQLite's default database the migration makes the directory: a note says so.
    With a database elsewhere nothing makes it: a warning says it is missing (the note said
    "making a new, empty one" there too, and the warning then contradicted it)."""
    import observatory.cli as cli

    served: list[object] = []
    monkeypatch.setattr(cli, "_run_server", lambda app, *_a, **_k: served.append(app))
    monkeypatch.delenv("OBSERVATORY_DATABASE_URL", raising=False)
    made = tmp_path / "made"
    assert _run(made, "serve", "--no-telescope") == 0
    err = capsys.readouterr().err
    assert f"no installation at {made} (from --data-dir): made a new, empty one" in err
    assert "does not exist" not in err and made.is_dir()
    if migrated_db_url.startswith("sqlite"):
        return  # the rest is of a database outside the data directory
    monkeypatch.setenv("OBSERVATORY_DATABASE_URL", migrated_db_url)
    unmounted = tmp_path / "unmounted"
    assert _run(unmounted, "serve", "--no-telescope") == 0
    err = capsys.readouterr().err
    assert "no installation" not in err and "making" not in err and "made" not in err
    assert f"data directory {unmounted} does not exist (is the shared file system" in err
    assert not unmounted.exists() and len(served) == 2


def test_users_revoke_key_ends_the_key_and_its_logins_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """There was no way for an operator to stop a leaked key short of making a new one."""
    from fastapi.testclient import TestClient

    from observatory.app import create_app

    data = tmp_path / "data"
    assert _run(data, "users", "create", "carol", "--api-key", "key-of-carol-1234") == 0
    auth = ("mantaray-clientv2.0", "key-of-carol-1234")
    with TestClient(create_app(Settings(data_dir=data))) as client:
        assert client.post("/api/api_login", auth=auth).status_code == 200
        assert client.get("/api/get_jobs").status_code == 200
        capsys.readouterr()
        assert _run(data, "users", "revoke-key", "carol") == 0
        assert "API key of carol revoked" in capsys.readouterr().out
        assert client.get("/api/get_jobs").status_code in (401, 403)  # its login ended
        assert client.post("/api/api_login", auth=auth).status_code in (401, 403)
    assert _run(data, "users", "revoke-key", "nobody") != 0
    assert "no user named 'nobody'" in capsys.readouterr().err
