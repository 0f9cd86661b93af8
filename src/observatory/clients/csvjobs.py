"""The mwa_client CSV job file: one job per line, ``key=value`` cells.

The format of manta-ray-client's ``mwa_client`` (its README and ``parse_csv``):
cells separated by commas, spaces anywhere ignored (and any Unicode whitespace around
a key or a value, as the server strips them), blank lines and lines whose
first cell starts with ``#`` skipped, ``job_type`` ``c`` / ``d`` / ``v`` choosing
the endpoint, a cell with an empty key or value ignored, ``allow_resubmit`` added
from the command line unless the line sets it. The cotter-era keys of older job
files (``timeres``, ``freqres``, ``edgewidth``, ``conversion``, ``norfi``, ...) are
renamed to the current ones, so old files keep working.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from observatory.preprocess.options import LEGACY_KEYS, same_value

#: ``job_type`` cell value -> ASVO endpoint.
ENDPOINTS = {"c": "conversion_job", "d": "download_vis_job", "v": "voltage_job"}


class CsvJobError(ValueError):
    """A line of the job file that cannot be read; names the line number and the cell."""

    def __init__(self, line_number: int, cell: str | None, problem: str) -> None:
        where = f"line {line_number}" + (f", cell {cell!r}" if cell is not None else "")
        super().__init__(f"{where}: {problem}")
        self.line_number = line_number
        self.cell = cell


@dataclass(frozen=True)
class CsvJob:
    """One job of the file: where to post it and its form fields."""

    line_number: int
    endpoint: str
    params: dict[str, str] = field(default_factory=dict)


def decode_job_csv(data: bytes) -> str:
    """A job file's bytes as text: UTF-8, with or without a byte-order mark.

    Excel's "CSV UTF-8" starts the file with a byte-order mark, which would otherwise
    become part of the first key (``\\ufeffobs_id``).

    Raises
    ------
    CsvJobError
        Naming the line and column of the first byte that is not UTF-8 (a file saved
        as Latin-1 or Windows-1252, say).
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line_number = data.count(b"\n", 0, exc.start) + 1
        raise CsvJobError(
            line_number, None,
            f"byte 0x{data[exc.start]:02x} at column {exc.start - line_start + 1} is not UTF-8 "
            "text: save the file as UTF-8",
        ) from None  # fmt: skip


def parse_job_csv(text: str, *, allow_resubmit: bool = False) -> list[CsvJob]:
    """The jobs of a job file's text (a leading byte-order mark is ignored).

    Raises
    ------
    CsvJobError
        For the first malformed line: a cell without exactly one ``=``, a key given twice,
        an option given under its two names with values that differ (``timeres=16,
        avg_time_res=8``; the same value is sent once), an unknown ``job_type``, or a line
        without one.
    """
    text = text.removeprefix("\ufeff")
    jobs = []
    # Line by line, as the file is numbered: a quote in one line (a comment's inch mark)
    # must not open a field that runs over the lines after it, which would then be skipped
    # with the comment. Universal newlines, as reading the file in text mode gives.
    for line_number, line in enumerate(io.StringIO(text, newline=None), start=1):
        try:
            row = next(csv.reader([line.rstrip("\n")]), [])
        except csv.Error as exc:  # a cell over csv's field size limit (131,072 characters)
            raise CsvJobError(line_number, None, f"cannot be read as CSV: {exc}") from None
        if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
            continue
        endpoint = None
        params: dict[str, str] = {}
        given: dict[str, tuple[str, str]] = {}  # key (after renaming) -> (key, value) as written
        for raw_cell in row:
            # Spaces anywhere go, as mwa_client removes them; other whitespace (a
            # non-breaking space pasted from a web page, an em space) around a key or a
            # value goes too, as the server strips each with str.strip().
            cell = raw_cell.replace(" ", "").replace("\t", "").strip()
            if not cell:
                continue
            parts = cell.split("=")
            if len(parts) != 2:
                raise CsvJobError(line_number, raw_cell.strip(), "a cell must be key=value")
            key, value = (part.strip() for part in parts)
            if not key or not value:
                continue  # an option not given (as mwa_client reads it)
            if key == "job_type":
                if endpoint is not None:
                    raise CsvJobError(
                        line_number, raw_cell.strip(), "job_type is given twice on this line"
                    )
                endpoint = ENDPOINTS.get(value)
                if endpoint is None:
                    raise CsvJobError(
                        line_number, raw_cell.strip(), "job_type must be c (conversion), "
                        "d (visibility download) or v (voltage download)",
                    )  # fmt: skip
                continue
            name = LEGACY_KEYS.get(key, key)
            if name in given:
                # The server's rules: a key twice is refused; one option under its two names
                # (timeres and avg_time_res) must ask for one thing, and then is sent once.
                first_key, first_value = given[name]
                if first_key == key:
                    raise CsvJobError(
                        line_number, raw_cell.strip(),
                        f"{key} is given twice on this line (also as {key}={first_value}): "
                        "keep one",
                    )  # fmt: skip
                if not same_value(first_value, value):
                    raise CsvJobError(
                        line_number, raw_cell.strip(),
                        f"{key}={value} contradicts {first_key}={first_value} (the same option "
                        "under another name): keep one",
                    )  # fmt: skip
                continue
            given[name] = (key, value)
            params[name] = value
        if endpoint is None:
            raise CsvJobError(line_number, None, "no job_type cell (job_type=c, d or v)")
        params.setdefault("allow_resubmit", str(allow_resubmit).lower())
        jobs.append(CsvJob(line_number, endpoint, params))
    return jobs
