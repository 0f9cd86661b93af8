"""Trigger parameters as the real clients send them."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from observatory.trigger.params import (
    ParameterError,
    as_bool,
    as_float_list,
    as_number,
    as_str_list,
    conflicting_group_ids,
    decode_value,
    is_bool_word,
    merge_request_parameters,
)


def test_triggerservice_form_body_labelled_json_merges_with_the_query() -> None:
    # What triggerservice.py sends: urlencode(postdict) of str() values, project_id in the query.
    body = urlencode({"secure_key": "k", "ra": str([10.5, 20.0]), "source": str(["Sun", "Moon"]),
                      "freqspecs": '["121,24", "145,24"]', "pretend": "True", "group_id": "1234567896"})  # fmt: skip
    merged = merge_request_parameters([("project_id", "G0055"), ("obsname", "grb")], body.encode())
    assert merged["project_id"] == "G0055" and merged["obsname"] == "grb"
    assert as_float_list("ra", merged["ra"]) == [10.5, 20.0]
    assert as_str_list("source", merged["source"]) == ["Sun", "Moon"]
    assert as_str_list("freqspecs", merged["freqspecs"]) == ["121,24", "145,24"]
    assert merged["groupid"] == "1234567896" and "group_id" not in merged


def test_group_id_is_renamed_groupid_unless_the_two_differ() -> None:
    assert merge_request_parameters([("group_id", "111")], b"groupid=111") == {"groupid": "111"}
    assert merge_request_parameters([("group_id", "111")], b'{"groupid": 111}') == {"groupid": 111}
    # An unset name (empty, None, null) is as if not sent: the other one stands.
    assert merge_request_parameters([("group_id", "")], b"groupid=222") == {"groupid": "222"}
    assert merge_request_parameters([("group_id", "111")], b"groupid=None") == {"groupid": "111"}
    differ = merge_request_parameters([("group_id", "111")], b"groupid=222")
    assert differ == {"group_id": "111", "groupid": "222"}
    assert conflicting_group_ids(differ) is not None
    assert "'111' and '222'" in (conflicting_group_ids(differ) or "")
    assert conflicting_group_ids({"group_id": "111", "groupid": 111}) is None


def test_json_bodies_repeated_keys_and_numpy_reprs() -> None:
    merged = merge_request_parameters([("ra", "1"), ("ra", "2")], b'{"dec": [-30, -40], "nobs": 2}')
    assert as_float_list("ra", merged["ra"]) == [1.0, 2.0]
    assert as_float_list("dec", merged["dec"]) == [-30.0, -40.0]
    assert as_number("nobs", merged["nobs"], integer=True) == 2
    assert as_float_list("ra", "[np.float64(12.5), np.float64(13.0)]") == [12.5, 13.0]
    with pytest.raises(ParameterError, match="not valid JSON"):
        merge_request_parameters([], b"{not json")
    with pytest.raises(ParameterError, match="object"):
        merge_request_parameters([], b"[1, 2]")


@pytest.mark.parametrize("word", ["true", "True", "TRUE", "1", "y", "Yes", "on", "ON", "t"])
def test_true_words(word: str) -> None:
    assert as_bool("pretend", word) is True


@pytest.mark.parametrize("word", ["false", "False", "0", "n", "NO", "off", "f"])
def test_false_words(word: str) -> None:
    assert as_bool("pretend", word) is False


def test_bad_values_are_named() -> None:
    with pytest.raises(ParameterError, match="pretend: 'maybe' is not a boolean"):
        as_bool("pretend", "maybe")
    with pytest.raises(ParameterError, match="ra: 'abc' is not a number"):
        as_float_list("ra", "['abc']")
    with pytest.raises(ParameterError, match=r"nobs: '2\.5' is not a whole number"):
        as_number("nobs", "2.5", integer=True)


def test_python_literals_are_parsed_never_evaluated() -> None:
    assert decode_value("['Sun', 'Moon']") == ["Sun", "Moon"]
    # Not a literal: kept as text, nothing runs.
    assert decode_value("__import__('os').system('false')") == "__import__('os').system('false')"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", True), ("-1", True), ("+7", True), ("00", False), (2, True), (0, False), (-3, True)],
)
def test_integers_are_booleans_non_zero_is_true(value: object, expected: bool) -> None:
    # The wiki: current is true for "a non-zero integer"; pretend, avoidsun and calibrator
    # take "Boolean, integer, or string".
    assert as_bool("current", value) is expected
    assert is_bool_word(value)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 1e300, "99999999999999999999999", "1e300", "NaN", "2.5"]
)
def test_non_finite_huge_and_fractional_booleans_are_refused(value: object) -> None:
    with pytest.raises(ParameterError, match="pretend"):
        as_bool("pretend", value)


def test_source_names_are_not_booleans() -> None:
    assert not is_bool_word("3C444") and not is_bool_word("HydA")
