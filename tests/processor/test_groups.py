"""Small files sharing one transaction (``Ingester.ingest_group``) give what one-by-one ingestion gives."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor import ingest as ingest_module
from processor.ingest import Ingester
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, PAN42_HEADER, SHARED, at, write_delivery
from tests.processor.test_newest_wins import READING_KEYS, energies, row, write_deliveries

TABLES = (
    "files",
    "panoramic_measurements",
    "pan42_measurements",
    "greenbutton_intervals",
    "greenbutton_usage_points",
    "greenbutton_reading_types",
    "greenbutton_usage_summaries",
)


def dump(store: Store) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows in a stable order, without the times the ledger takes from the clock."""
    out = {}
    for table in TABLES:
        columns = [c for c in store.table_columns(table) if c not in ("first_seen_at", "ingested_at")]
        select = ", ".join(f'"{c}"' for c in columns)
        out[table] = store.con.execute(f"SELECT {select} FROM {table} ORDER BY ALL").fetchall()
    return out


def mixed_deliveries(folder: Path) -> list[Path]:
    """Every kind of small file, a bad one and a copy among them."""
    files = [
        write_delivery(
            folder / "a.csv",
            [MEASUREMENTS_HEADER, row(1, "2024-01-01T08:00:00Z", "5"), row(2, "2024-01-01T08:00:00Z", "6")],
            at("2024-01-01 10:00"),
        ),
        write_delivery(
            folder / "bad.csv",
            [
                MEASUREMENTS_HEADER,
                row(3, "2024-01-01T08:00:00Z", "7"),
                "1,dev,not a time,15,1,site,1,230,2,1,8",
            ],
            at("2024-01-01 10:01"),
        ),
        write_delivery(
            folder / "p42.csv",
            [PAN42_HEADER, "9,dev 9,2024-01-01T08:00:00Z,15,1,site,A,1,230,2,1,100,5,50,50"],
            at("2024-01-01 10:02"),
        ),
        write_delivery(
            folder / "b.csv",
            [MEASUREMENTS_HEADER, row(1, "2024-01-01T08:00:00Z", "50")],
            at("2024-01-01 10:03"),
        ),
        write_delivery(
            folder / "older.csv",
            [MEASUREMENTS_HEADER, row(2, "2024-01-01T08:00:00Z", "-1")],
            at("2024-01-01 09:00"),
        ),
    ]
    copy = folder / "copy-of-a.csv"
    shutil.copy2(files[0], copy)
    files.append(copy)
    for sample in (
        "TestGBDataHourlyNineDaysBinnedDaily.xml",
        "ngma_natural_gas_billing_billing_data_Service_1_1_2021-05-26_to_2024-04-25.xml",
        "SCE-NEMFILE.csv",
    ):
        files.append(Path(shutil.copy2(SHARED / "samples" / "greenbutton" / sample, folder / sample)))
    return files


def test_a_group_equals_one_by_one(tmp_path: Path) -> None:
    files = mixed_deliveries(tmp_path / "drop")
    with Store(tmp_path / "one.duckdb") as one:
        singles = [Ingester(one).ingest(p) for p in files]
        expected = dump(one)
    with Store(tmp_path / "group.duckdb") as grouped:
        outcomes = Ingester(grouped).ingest_group(files)
        got = dump(grouped)
    assert [(o.status, o.rows, o.file_id) for o in outcomes] == [
        (o.status, o.rows, o.file_id) for o in singles
    ]
    assert [o.status for o in outcomes[:6]] == [
        "ingested",
        "rejected",
        "ingested",
        "ingested",
        "ingested",
        "duplicate",
    ]
    assert got == expected
    assert len(got["greenbutton_intervals"]) > 0


def test_a_rejected_file_in_a_group_leaves_no_rows(tmp_path: Path) -> None:
    files = mixed_deliveries(tmp_path / "drop")[:5]
    with Store(tmp_path / "db.duckdb") as store:
        outcomes = Ingester(store).ingest_group(files)
        assert outcomes[1].status == "rejected" and "line 3" in (outcomes[1].detail or "")
        assert store.con.execute(
            "SELECT count(*) FROM panoramic_measurements WHERE source_path LIKE '%bad.csv'"
        ).fetchone() == (0,)
        # newest wins across the group: b.csv (10:03) beats a.csv, older.csv (09:00) loses to a.csv
        assert energies(store) == {("1", "08:00", 15): 50.0, ("2", "08:00", 15): 6.0}


def test_a_group_stops_at_a_zip_and_a_large_file_goes_alone(tmp_path: Path, monkeypatch) -> None:
    drop = tmp_path / "drop"
    small = [
        write_delivery(drop / f"s{i}.csv", [MEASUREMENTS_HEADER, row(i, "2024-01-01T08:00:00Z", "1")])
        for i in range(3)
    ]
    archive = drop / "z.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(small[0], "inner.csv")
    big = write_delivery(
        drop / "big.csv",
        [MEASUREMENTS_HEADER] + [row(9, f"2024-01-0{d}T08:00:00Z", "1") for d in range(1, 9)],
    )
    monkeypatch.setattr(ingest_module, "GROUP_FILE_BYTES", big.stat().st_size - 1)
    with Store(tmp_path / "db.duckdb") as store:
        ingester = Ingester(store)
        assert [o.path for o in ingester.ingest_group([*small[:2], archive, small[2]])] == [
            str(p) for p in small[:2]
        ]
        assert [o.format for o in ingester.ingest_group([archive, small[2]])] == ["zip"]
        assert [o.rows for o in ingester.ingest_group([big, small[2]])] == [8]
        assert ingester.ingest_group([]) == []


def test_a_group_past_its_deadline_still_takes_one_file(tmp_path: Path) -> None:
    files = [
        write_delivery(tmp_path / f"s{i}.csv", [MEASUREMENTS_HEADER, row(i, "2024-01-01T08:00:00Z", "1")])
        for i in range(3)
    ]
    with Store(tmp_path / "db.duckdb") as store:
        assert len(Ingester(store).ingest_group(files, until=0.0)) == 1


def test_a_failed_group_merge_falls_back_to_one_by_one(tmp_path: Path, monkeypatch) -> None:
    files = mixed_deliveries(tmp_path / "drop")[:4]
    with Store(tmp_path / "db.duckdb") as store:
        real_merge = store.merge
        calls = {"n": 0}

        def failing_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise duckdb.ConversionException("simulated failure of the group's merge")
            return real_merge(*args, **kwargs)

        monkeypatch.setattr(store, "merge", failing_once)
        outcomes = Ingester(store).ingest_group(files)
        assert [o.status for o in outcomes] == ["ingested", "rejected", "ingested", "ingested"]
        assert store.con.execute("SELECT count(*) FROM files").fetchone() == (4,)
        assert energies(store) == {("1", "08:00", 15): 50.0, ("2", "08:00", 15): 6.0}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    deliveries=st.lists(
        st.tuples(
            st.lists(st.tuples(st.sampled_from(READING_KEYS), st.integers(0, 999)), min_size=1, max_size=6),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=6,
    ),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_any_grouping_in_any_order_equals_delivery_order(deliveries, order, cuts) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shuffled, expected = write_deliveries(folder, deliveries)
        order.shuffle(shuffled)
        with Store(folder / "db.duckdb") as store:
            ingester = Ingester(store)
            remaining, statuses = list(shuffled), []
            for cut in cuts * len(shuffled):
                if not remaining:
                    break
                outcomes = ingester.ingest_group(remaining[:cut])
                statuses += [o.status for o in outcomes]
                del remaining[: len(outcomes)]
            assert not remaining and set(statuses) == {"ingested"}
            assert energies(store) == expected
