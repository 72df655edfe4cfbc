"""Reading ahead (``processor.readahead``) changes when files are parsed, never what is stored."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from processor import panoramic
from processor.ingest import Ingester
from processor.readahead import ReadAhead, prepare, signature
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, at, write_delivery
from tests.processor.test_groups import dump, mixed_deliveries
from tests.processor.test_newest_wins import energies, row


def test_a_group_read_ahead_equals_one_by_one(tmp_path: Path) -> None:
    files = mixed_deliveries(tmp_path / "drop")
    with Store(tmp_path / "one.duckdb") as one:
        singles = [Ingester(one).ingest(p) for p in files]
        expected = dump(one)
    with Store(tmp_path / "ahead.duckdb") as store, ReadAhead() as read_ahead:
        ingester = Ingester(store, read_ahead=read_ahead)
        outcomes = []
        while len(outcomes) < len(files):  # groups of two: later files are read ahead across groups
            outcomes += ingester.ingest_group(files[len(outcomes) : len(outcomes) + 2])
        got = dump(store)
    assert [(o.status, o.rows, o.detail) for o in outcomes] == [(o.status, o.rows, o.detail) for o in singles]
    assert got == expected


def test_files_read_ahead_are_parsed_once(tmp_path: Path, monkeypatch) -> None:
    files = [
        write_delivery(
            tmp_path / f"m{i}.csv",
            [MEASUREMENTS_HEADER, row(i, "2024-01-01T08:00:00Z", str(i))],
            at(f"2024-01-01 10:0{i}"),
        )
        for i in range(4)
    ]
    calls: list[str] = []
    typed_rows = panoramic.typed_rows

    def counting(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return typed_rows(*args, **kwargs)

    monkeypatch.setattr(panoramic, "typed_rows", counting)
    with Store(tmp_path / "db.duckdb") as store, ReadAhead() as read_ahead:
        outcomes = Ingester(store, read_ahead=read_ahead).ingest_group(files)
        assert [o.status for o in outcomes] == ["ingested"] * 4
        assert energies(store) == {(str(i), "08:00", 15): float(i) for i in range(4)}
    # The first file in line, the other three ahead: four parses, not seven.
    assert len(calls) == 4
    assert sum(name.startswith("read-ahead") for name in calls) == 3


def test_a_file_changed_after_it_was_read_ahead_is_read_again(tmp_path: Path) -> None:
    first = write_delivery(tmp_path / "a.csv", [MEASUREMENTS_HEADER, row(1, "2024-01-01T08:00:00Z", "5")],
                           at("2024-01-01 10:00"))  # fmt: skip
    second = write_delivery(tmp_path / "b.csv", [MEASUREMENTS_HEADER, row(2, "2024-01-01T08:00:00Z", "6")],
                            at("2024-01-01 10:01"))  # fmt: skip
    with ReadAhead() as read_ahead:
        read_ahead.ahead([second])
        assert read_ahead.take(second, second.stat()) is not None  # read ahead, and still as it was
        read_ahead.ahead([second])
        # Rewritten while waiting (same size, same modification time): its inode or change time differs.
        text = second.read_text().replace(",6", ",7")
        replaced = tmp_path / "b.new"
        replaced.write_text(text)
        os.utime(replaced, ns=(second.stat().st_atime_ns, second.stat().st_mtime_ns))
        # wait until the old content has been read ahead, then replace the file under it
        waiting = read_ahead._waiting[second][0]
        assert waiting.result() is not None
        replaced.replace(second)
        with Store(tmp_path / "db.duckdb") as store:
            outcomes = Ingester(store, read_ahead=read_ahead).ingest_group([first, second])
            assert [o.status for o in outcomes] == ["ingested", "ingested"]
            assert energies(store) == {("1", "08:00", 15): 5.0, ("2", "08:00", 15): 7.0}


def test_files_already_in_the_ledger_are_not_read_ahead(tmp_path: Path, monkeypatch) -> None:
    files = [
        write_delivery(
            tmp_path / f"m{i}.csv",
            [MEASUREMENTS_HEADER, row(i, "2024-01-01T08:00:00Z", "1")],
            at(f"2024-01-01 10:0{i}"),
        )
        for i in range(3)
    ]
    with Store(tmp_path / "db.duckdb") as store:
        Ingester(store).ingest_group(files)
        parsed: list[object] = []
        typed_rows = panoramic.typed_rows
        monkeypatch.setattr(panoramic, "typed_rows", lambda *a, **k: parsed.append(a) or typed_rows(*a, **k))
        with ReadAhead() as read_ahead:  # a restart's rescan: every file is known, none is read
            outcomes = Ingester(store, read_ahead=read_ahead).ingest_group(files)
        assert [o.status for o in outcomes] == ["unchanged"] * 3
        assert parsed == []


def test_prepare_leaves_what_it_cannot_parse_to_the_ingest(tmp_path: Path) -> None:
    bad = write_delivery(tmp_path / "bad.csv", [MEASUREMENTS_HEADER, "1,dev,not a time,15,1,site,1,230,2,1,8"],
                         at("2024-01-01 10:00"))  # fmt: skip
    prepared = prepare(bad)
    assert prepared is not None and prepared.blocks == () and prepared.signature == signature(bad.stat())
    with Store(tmp_path / "db.duckdb") as store, ReadAhead() as read_ahead:
        read_ahead.ahead([bad])
        outcome = Ingester(store, read_ahead=read_ahead).ingest_group([bad])[0]
        assert outcome.status == "rejected" and "line 2" in (outcome.detail or "")
