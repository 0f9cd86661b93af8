"""The mwa_client CSV job file."""

from __future__ import annotations

import pytest

from observatory.clients.csvjobs import CsvJob, CsvJobError, decode_job_csv, parse_job_csv
from observatory.preprocess.options import ConversionOptions


def test_current_and_legacy_lines() -> None:
    text = (
        "# my jobs\n"
        "\n"
        "obs_id=1320409688, job_type=c, avg_time_res=4, output = ms, unknown_key=1\n"
        "  obs_id = 1131733552 ,job_type=d, download_type=vis_meta\n"
        "obs_id=1320412440, job_type=v, offset=0, duration=8, allow_resubmit=true\n"
        "obs_id=1061315448, job_type=c, timeres=2, freqres=40, edgewidth=80, conversion=uvfits, norfi=true\n"
        ",,\n"
    )
    jobs = parse_job_csv(text)
    assert jobs == [
        CsvJob(3, "conversion_job", {"obs_id": "1320409688", "avg_time_res": "4", "output": "ms",
                                     "unknown_key": "1", "allow_resubmit": "false"}),
        CsvJob(4, "download_vis_job", {"obs_id": "1131733552", "download_type": "vis_meta",
                                       "allow_resubmit": "false"}),
        CsvJob(5, "voltage_job", {"obs_id": "1320412440", "offset": "0", "duration": "8",
                                  "allow_resubmit": "true"}),
        CsvJob(6, "conversion_job", {"obs_id": "1061315448", "avg_time_res": "2", "avg_freq_res": "40",
                                     "flag_edge_width": "80", "output": "uvfits", "no_rfi": "true",
                                     "allow_resubmit": "false"}),
    ]  # fmt: skip
    assert (
        parse_job_csv("obs_id=1, job_type=d", allow_resubmit=True)[0].params["allow_resubmit"]
        == "true"
    )


def test_empty_keys_and_values_are_ignored_as_mwa_client_does() -> None:
    (job,) = parse_job_csv("obs_id=1320409688, job_type=d, download_type=vis, avg_time_res=, =5\n")
    assert job.params == {"obs_id": "1320409688", "download_type": "vis", "allow_resubmit": "false"}


@pytest.mark.parametrize(
    ("text", "line", "cell", "fragment"),
    [
        ("obs_id=1, job_type=d\nobs_id=2, job_type=x\n", 2, "job_type=x", "job_type must be c"),
        ("obs_id=1, job_type=d\n\n# c\nobs_id=2, download_type=vis\n", 4, None, "no job_type cell"),
        ("obs_id=1, job_type=d, avg_time_res\n", 1, "avg_time_res", "must be key=value"),
        ("obs_id=1=2, job_type=d\n", 1, "obs_id=1=2", "must be key=value"),
        (
            "obs_id=1, job_type=d, download_type=vis, obs_id=2\n",
            1,
            "obs_id=2",
            "obs_id is given twice on this line (also as obs_id=1)",
        ),
        (
            "obs_id=1, job_type=c, timeres=16, avg_time_res=8\n",
            1,
            "avg_time_res=8",
            "avg_time_res=8 contradicts timeres=16 (the same option under another name)",
        ),
        # The key as written (it said "avg_time_res is given twice").
        (
            "obs_id=1, job_type=c, timeres=16, timeres=16\n",
            1,
            "timeres=16",
            "timeres is given twice on this line (also as timeres=16): keep one",
        ),
        ("obs_id=1, job_type=c, job_type=d\n", 1, "job_type=d", "job_type is given twice"),
    ],
)
def test_errors_name_the_line_and_the_cell(
    text: str, line: int, cell: str | None, fragment: str
) -> None:
    with pytest.raises(CsvJobError) as error:
        parse_job_csv(text)
    assert error.value.line_number == line and error.value.cell == cell
    assert str(error.value).startswith(f"line {line}") and fragment in str(error.value)


@pytest.mark.parametrize(
    "cells",
    ["timeres=16, avg_time_res=16", "avg_time_res=16, timeres=16.0", "norfi=TRUE, no_rfi=true"],
)
def test_one_option_under_its_two_names_with_one_value_is_sent_once(cells: str) -> None:
    """The server's rule (preprocess.options.same_value): the client refused these."""
    (job,) = parse_job_csv(f"obs_id=1, job_type=c, {cells}\n")
    assert len(job.params) == 3  # obs_id, the option under its current name, allow_resubmit
    name = next(key for key in job.params if key not in ("obs_id", "allow_resubmit"))
    assert name in ("avg_time_res", "no_rfi")
    assert ConversionOptions.from_params(job.params) == ConversionOptions.from_params(
        dict(cell.split("=") for cell in cells.replace(" ", "").split(","))
    )


def test_any_line_ending_is_a_line_end() -> None:
    """Text given to the API with old Mac (CR) or Windows (CRLF) line ends reads as a file
    opened in text mode does (csv alone refuses a bare CR inside a field)."""
    for end in ("\r", "\r\n", "\n"):
        text = f"obs_id=1, job_type=d{end}obs_id=2, job_type=c, output=ms{end}"
        assert [(job.line_number, job.params["obs_id"]) for job in parse_job_csv(text)] == [
            (1, "1"),
            (2, "2"),
        ]


def test_a_quote_in_a_comment_does_not_swallow_the_lines_after_it() -> None:
    """A comment's quote opened a csv field running to the next quote: the jobs between
    were read as part of the comment and silently not submitted."""
    text = (
        '# metadata,"3 jobs\n'
        "obs_id=1, job_type=d\n"
        "obs_id=2, job_type=d\n"
        '# 12" dish test\n'
        "obs_id=3, job_type=d\n"
    )
    assert [(job.line_number, job.params["obs_id"]) for job in parse_job_csv(text)] == [
        (2, "1"),
        (3, "2"),
        (5, "3"),
    ]


def test_a_byte_order_mark_is_not_part_of_the_first_key() -> None:
    # Excel's "CSV UTF-8" writes one.
    data = "obs_id=1320409688, job_type=d, download_type=vis\n".encode("utf-8-sig")
    assert data.startswith(b"\xef\xbb\xbf")
    for text in (decode_job_csv(data), data.decode("utf-8")):
        (job,) = parse_job_csv(text)
        assert job.params["obs_id"] == "1320409688"
        assert "\ufeffobs_id" not in job.params


def test_a_file_that_is_not_utf8_names_the_line() -> None:
    data = "# my jobs\n# café run\nobs_id=1320409688, job_type=d, download_type=vis\n".encode(
        "latin-1"
    )
    with pytest.raises(CsvJobError) as caught:
        decode_job_csv(data)
    assert caught.value.line_number == 2
    assert str(caught.value) == (
        "line 2: byte 0xe9 at column 6 is not UTF-8 text: save the file as UTF-8"
    )
    assert decode_job_csv("# café\n".encode()) == "# café\n"


@pytest.mark.parametrize(
    "whitespace", ["\u00a0", "\u2003", "\u3000", "\u202f", "\u00a0 \t"]
)  # no-break, em, ideographic, narrow no-break spaces; mixed
def test_unicode_whitespace_around_keys_and_values_is_ignored_as_the_server_strips_it(
    whitespace: str,
) -> None:
    """A non-breaking space pasted from a web page after a comma: "no job_type cell"."""
    w = whitespace
    (job,) = parse_job_csv(f"obs_id=1480332008,{w}job_type=d, download_type{w}={w}vis_meta{w}\n")
    assert job == CsvJob(
        1, "download_vis_job",
        {"obs_id": "1480332008", "download_type": "vis_meta", "allow_resubmit": "false"},
    )  # fmt: skip


def test_characters_the_server_does_not_strip_stay() -> None:
    """Only whitespace goes (str.strip, as the server's): a zero-width space is no space."""
    (job,) = parse_job_csv("obs_id=1480332008, job_type=d, download_type=vis_meta\u200b\n")
    assert job.params["download_type"] == "vis_meta\u200b"
