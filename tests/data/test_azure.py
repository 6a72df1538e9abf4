from __future__ import annotations

from pathlib import Path

import pytest

from ecoserve.data.azure import load_azure_trace, parse_timestamp_ns


@pytest.mark.parametrize(("kind", "rows"), [("conv", 19_366), ("code", 8_819)])
def test_trace_has_every_row_starting_at_zero_in_order(kind: str, rows: int) -> None:
    trace = load_azure_trace(kind)
    assert len(trace) == rows
    assert trace[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
    assert all(r.prompt is None and r.prompt_len >= 1 and r.output_len >= 1 for r in trace)
    # The sample spans just under an hour of production traffic.
    assert 3_400 < trace[-1].arrival_s < 3_600


def test_conv_trace_values_match_the_csv() -> None:
    first, second = load_azure_trace("conv", limit=2)
    # 2023-11-16 18:15:46.6805900,374,44 then 18:15:50.9951690,396,109
    assert (first.prompt_len, first.output_len) == (374, 44)
    assert (second.prompt_len, second.output_len) == (396, 109)
    assert second.arrival_s == pytest.approx(4.314579, abs=1e-9)


def test_limit_takes_a_prefix() -> None:
    assert load_azure_trace("code", limit=100) == load_azure_trace("code")[:100]
    assert load_azure_trace("code", limit=0) == []


def test_timestamps_keep_all_seven_fractional_digits() -> None:
    base = parse_timestamp_ns("2023-11-16 18:17:03.9799600")
    assert parse_timestamp_ns("2023-11-16 18:17:03.9799601") - base == 100
    assert parse_timestamp_ns("2023-11-16 18:17:04.0319600") - base == 52_000_000
    assert parse_timestamp_ns("2023-11-17 00:00:00") - parse_timestamp_ns(
        "2023-11-16 23:59:59.5"
    ) == 500_000_000


@pytest.mark.parametrize("text", ["2023-11-16T18:17:03.x", "yesterday", "2023-13-01 00:00:00"])
def test_bad_timestamp_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp_ns(text)


def test_unknown_kind_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'chat'.*allowed: 'conv', 'code'"):
        load_azure_trace("chat")


def test_bad_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="limit"):
        load_azure_trace("conv", limit=-5)


def test_a_trace_file_in_the_same_format_is_read_from_its_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-01-01 00:00:00,10,5\n2024-01-01 00:00:01.5,20,7\n"
    )
    trace = load_azure_trace(path=path)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in trace] == [(0.0, 10, 5), (1.5, 20, 7)]


def test_a_missing_trace_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        load_azure_trace(path=tmp_path / "nope.csv")


def test_a_trace_file_with_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match="expected header TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_azure_trace(path=path)
