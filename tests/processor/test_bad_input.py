"""A file with an unusable row is rejected whole, with the line, and nothing of it is stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor import csvfile
from processor.errors import Rejected
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, at, write_delivery

GOOD = "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("2,b,2024-01-01T00:00:00Z,60,1,s,1,230,2,1", "line 3: expected 11 fields, found 10"),
        ("2,b,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3,99", "line 3: expected 11 fields, found 12"),
        ("2,b,2024-01-01T00:00:00Z,60,1,s,1,230,two,1,3", "line 3: power(W) value 'two' is not a number"),
        (
            "2,b,yesterday,60,1,s,1,230,2,1,3",
            "line 3: measurement_time(UTC) value 'yesterday' is not a date and time",
        ),
        (
            "2,b,2024-13-01T00:00:00Z,60,1,s,1,230,2,1,3",
            "line 3: measurement_time(UTC) value '2024-13-01T00:00:00Z'",
        ),
        (
            "2,b,2024-01-01T00:00:00Z,7.5,1,s,1,230,2,1,3",
            "line 3: resolution(minutes) value '7.5' is not a whole number",
        ),
        (",b,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3", "line 3: device_id is empty"),
        ("2,b,N/A,60,1,s,1,230,2,1,3", "line 3: measurement_time(UTC) is empty"),
    ],
)
def test_bad_row_rejects_whole_file_naming_the_line(
    tmp_path: Path, store: Store, ingest, bad_line: str, reason: str
) -> None:
    path = write_delivery(
        tmp_path / "bad.csv", [MEASUREMENTS_HEADER, GOOD, bad_line, GOOD.replace("1,a", "3,c")]
    )
    outcome = ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail is not None and outcome.detail.startswith(reason), outcome.detail
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)
    assert store.con.execute("SELECT status, rows, error FROM files").fetchall() == [
        ("rejected", None, outcome.detail)
    ]
    assert path.exists()  # never moved or deleted


def test_truncated_last_line_is_rejected(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(
        tmp_path / "cut.csv",
        [MEASUREMENTS_HEADER, GOOD, "2,b,2024-01-01T00:15:00Z,60,1,s,1,2"],
        final_newline=False,
    )
    outcome = ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail == (
        "line 3: expected 11 fields, found 8 (the last line is cut off: was the file still being written?)"
    )
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)


def test_truncated_mid_timestamp_is_rejected(tmp_path: Path, ingest) -> None:
    cut = GOOD + "\n2,b,2024-01-01T00:1"
    path = write_delivery(tmp_path / "cut.csv", [MEASUREMENTS_HEADER, cut], final_newline=False)
    outcome = ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail is not None and outcome.detail.startswith("line 3: expected 11 fields, found 3")


def test_complete_last_line_without_newline_is_accepted(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(tmp_path / "ok.csv", [MEASUREMENTS_HEADER, GOOD], final_newline=False)
    assert ingest(path).status == "ingested"


def test_bad_row_in_a_later_block_rolls_back_earlier_blocks(
    tmp_path: Path, store: Store, ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks are merged as they are parsed; a reject in block 3 must undo blocks 1 and 2."""
    monkeypatch.setattr(csvfile, "BLOCK_SIZE", 256)
    monkeypatch.setattr(csvfile.read_blocks, "__defaults__", (256,))
    lines = [MEASUREMENTS_HEADER] + [
        f"{d},dev,2024-01-01T{h:02d}:00:00Z,60,1,s,1,230,2,1,3" for h in range(24) for d in range(3)
    ]
    lines[60] = lines[60].replace(",3", ",x")
    outcome = ingest(write_delivery(tmp_path / "long.csv", lines, at("2024-01-02 00:00")))
    assert outcome.status == "rejected"
    assert outcome.detail == "line 61: energy(Wh) value 'x' is not a number"
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)


def test_small_blocks_give_the_same_table_as_one_block(
    tmp_path: Path, store: Store, ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cutting a file into blocks (at quoted commas and newlines) changes nothing."""
    monkeypatch.setattr(csvfile.read_blocks, "__defaults__", (97,))
    lines = [MEASUREMENTS_HEADER] + [
        f'{d},"dev, {d}",2024-01-01T{h:02d}:00:00Z,60,1,"site\nwith newline",1,230,2,1,{h}'
        for h in range(10) for d in range(2)
    ]  # fmt: skip
    outcome = ingest(write_delivery(tmp_path / "q.csv", lines))
    assert (outcome.status, outcome.rows) == ("ingested", 20)
    assert store.con.execute(
        "SELECT count(*), count(DISTINCT device_name), min(site_name), sum(energy_wh) FROM panoramic_measurements"
    ).fetchone() == (20, 2, "site\nwith newline", 90.0)


def test_a_file_up_to_the_one_piece_size_is_one_block_and_a_larger_one_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One piece saves a small file's second MERGE; beyond the limit, memory stays a few blocks."""
    monkeypatch.setattr(csvfile, "BLOCK_SIZE", 300)
    monkeypatch.setattr(csvfile, "ONE_PIECE_BYTES", 1000)
    row = "1,dev,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3"  # 45 bytes and a line break
    for rows, blocks in ((20, 1), (21, 1), (22, 4), (60, 10)):
        path = write_delivery(tmp_path / f"f{rows}.csv", [MEASUREMENTS_HEADER] + [row] * rows)
        header = csvfile.read_header(path.read_bytes()[: csvfile.HEADER_LIMIT])
        got = list(csvfile.read_blocks(path, header))
        assert (len(got), sum(b.frame.height for b in got)) == (blocks, rows), rows
        assert [b.first_line for b in got] == [
            2 + sum(g.frame.height for g in got[:i]) for i in range(len(got))
        ]


@pytest.mark.parametrize("one_piece", [True, False])
def test_a_line_over_the_limit_is_refused_whole_or_in_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_piece: bool
) -> None:
    """Read whole or block by block, a record longer than ``MAX_LINE_BYTES`` is refused by its line."""
    monkeypatch.setattr(csvfile, "MAX_LINE_BYTES", 300)
    monkeypatch.setattr(csvfile, "BLOCK_SIZE", 120)
    monkeypatch.setattr(csvfile, "ONE_PIECE_BYTES", 10_000 if one_piece else 100)
    row = "1,dev,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3"
    long_row = row.replace("dev", "d" * 400)
    path = write_delivery(tmp_path / "long.csv", [MEASUREMENTS_HEADER, row, row, long_row] + [row] * 20)
    header = csvfile.read_header(path.read_bytes()[: csvfile.HEADER_LIMIT])
    with pytest.raises(Rejected) as refused:
        list(csvfile.read_blocks(path, header))
    assert refused.value.reason.startswith("line 4: line longer than"), refused.value.reason
    fine = write_delivery(tmp_path / "fine.csv", [MEASUREMENTS_HEADER] + [row] * 24)
    assert sum(b.frame.height for b in csvfile.read_blocks(fine, header)) == 24


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a few hundred bytes count as a large file, appended as read and then settled."""
    from processor import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "APPEND_BYTES", 200)
    monkeypatch.setattr(csvfile.read_blocks, "__defaults__", (200,))


def _staging_tables(store: Store) -> list[tuple[str]]:
    return store.con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '_meterdrop_staging_%'"
    ).fetchall()


def test_large_file_is_appended_and_the_last_line_wins_across_blocks(
    tmp_path: Path, store: Store, ingest, small_blocks: None
) -> None:
    lines = [MEASUREMENTS_HEADER] + [f"{d},dev,2024-01-01T{h:02d}:00:00Z,60,1,s,1,230,2,1,{h}" for h in range(12)
                                      for d in range(3)]  # fmt: skip
    lines.append(
        "1,dev,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,999"
    )  # repeats the first reading, in a later block
    outcome = ingest(write_delivery(tmp_path / "big.csv", lines, at("2024-01-02 00:00")))
    assert (outcome.status, outcome.rows) == ("ingested", 37)
    assert store.con.execute("SELECT count(*), sum(energy_wh) FROM panoramic_measurements").fetchone() == (
        36, 3 * sum(range(12)) + 999.0)  # fmt: skip
    assert store.con.execute(
        "SELECT source_line, file_id FROM panoramic_measurements WHERE device_id = '1' AND energy_wh = 999"
    ).fetchone() == (38, outcome.file_id)


def test_a_bad_line_in_a_large_file_rejects_it_and_leaves_nothing(
    tmp_path: Path, store: Store, ingest, small_blocks: None
) -> None:
    lines = [MEASUREMENTS_HEADER] + [f"{d},dev,2024-01-01T{h:02d}:00:00Z,60,1,s,1,230,2,1,{h}" for h in range(12)
                                      for d in range(3)]  # fmt: skip
    lines[30] = lines[30].replace(",230,", ",volts,")
    outcome = ingest(write_delivery(tmp_path / "big.csv", lines))
    assert (outcome.status, outcome.detail) == (
        "rejected",
        "line 31: voltage(V) value 'volts' is not a number",
    )
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)


def test_scratch_tables_left_by_a_crash_are_dropped_at_open(tmp_path: Path) -> None:
    """Earlier versions staged large files in scratch tables; one killed meanwhile left its table."""
    with Store(tmp_path / "db.duckdb") as first:
        first.con.execute(
            "CREATE TABLE _meterdrop_staging_panoramic_measurements_1 AS FROM panoramic_measurements LIMIT 0"
        )
        assert len(_staging_tables(first)) == 1
    with Store(tmp_path / "db.duckdb") as second:
        assert _staging_tables(second) == []
