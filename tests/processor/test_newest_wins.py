"""The vendor's rule: the newest delivery of a reading overrides what was received before."""

from __future__ import annotations

import itertools
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor import ingest as ingest_module
from processor.ingest import Ingester
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, PAN42_HEADER, PULSE_HEADER, at, write_delivery


def row(device: int, time: str, energy: str, resolution: int = 15) -> str:
    return f"{device},dev {device},{time},{resolution},1,site,1,230,2,1,{energy}"


def energies(store: Store) -> dict[tuple[str, str, int], float | None]:
    rows = store.con.execute(
        "SELECT device_id, strftime(measurement_time, '%H:%M'), resolution_minutes, energy_wh "
        "FROM panoramic_measurements"
    ).fetchall()
    return {(d, t, r): e for d, t, r, e in rows}


def test_forming_bucket_is_completed_by_the_later_delivery(tmp_path: Path, store: Store, ingest) -> None:
    partial = write_delivery(
        tmp_path / "0900.csv",
        [MEASUREMENTS_HEADER, row(1, "2024-01-01T08:45:00Z", "40"), row(1, "2024-01-01T09:00:00Z", "7")],
        at("2024-01-01 09:05"),
    )
    complete = write_delivery(
        tmp_path / "1000.csv",
        [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "41"), row(1, "2024-01-01T09:15:00Z", "39")],
        at("2024-01-01 10:05"),
    )
    ingest(partial)
    ingest(complete)
    assert energies(store) == {("1", "08:45", 15): 40.0, ("1", "09:00", 15): 41.0, ("1", "09:15", 15): 39.0}
    file_of_0900 = store.con.execute(
        "SELECT f.path FROM panoramic_measurements m JOIN files f ON f.id = m.file_id "
        "WHERE strftime(m.measurement_time, '%H:%M') = '09:00'"
    ).fetchone()
    assert file_of_0900 == (str(complete),)


def test_an_older_delivery_processed_later_never_overrides(tmp_path: Path, store: Store, ingest) -> None:
    newer = write_delivery(
        tmp_path / "new.csv",
        [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "41")],
        at("2024-01-01 10:05"),
    )
    older = write_delivery(
        tmp_path / "old.csv",
        [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "7")],
        at("2024-01-01 09:05"),
    )
    ingest(newer)
    assert ingest(older).status == "ingested"
    assert energies(store) == {("1", "09:00", 15): 41.0}


def test_within_one_file_the_last_row_wins(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(
        tmp_path / "dups.csv",
        [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "1"), row(2, "2024-01-01T09:00:00Z", "5"),
         row(1, "2024-01-01T09:00:00Z", "2"), row(1, "2024-01-01T09:00:00Z", "3")],
    )  # fmt: skip
    assert ingest(path).rows == 4
    assert energies(store) == {("1", "09:00", 15): 3.0, ("2", "09:00", 15): 5.0}
    assert store.con.execute(
        "SELECT source_line FROM panoramic_measurements WHERE device_id = '1'"
    ).fetchone() == (5,)


def test_resolution_is_part_of_the_key(tmp_path: Path, store: Store, ingest) -> None:
    ingest(write_delivery(tmp_path / "a.csv", [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "10", 15),
                                                 row(1, "2024-01-01T09:00:00Z", "40", 60)]))  # fmt: skip
    assert energies(store) == {("1", "09:00", 15): 10.0, ("1", "09:00", 60): 40.0}


def test_same_delivery_time_is_broken_by_path(tmp_path: Path, store: Store, ingest) -> None:
    when = at("2024-01-01 10:00")
    b = write_delivery(tmp_path / "b.csv", [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "2")], when)
    a = write_delivery(tmp_path / "a.csv", [MEASUREMENTS_HEADER, row(1, "2024-01-01T09:00:00Z", "1")], when)
    ingest(a)
    ingest(b)
    assert energies(store) == {("1", "09:00", 15): 2.0}


def test_pan42_key_has_phase_and_pulse_key_has_meter(tmp_path: Path, store: Store, ingest) -> None:
    p42 = "9,M,2024-05-01T00:00:00Z,60,3,HQ,{},1,2,3,4,{},6,7,50"
    ingest(write_delivery(tmp_path / "p1.csv", [PAN42_HEADER, p42.format("R", 1), p42.format("S", 1)],
                          at("2024-05-01 01:00")))  # fmt: skip
    ingest(write_delivery(tmp_path / "p2.csv", [PAN42_HEADER, p42.format("S", 2)], at("2024-05-01 02:00")))
    assert store.con.execute("SELECT phase, energy_wh FROM pan42_measurements ORDER BY phase").fetchall() == [
        ("R", 1.0), ("S", 2.0)]  # fmt: skip
    pulse = "{},Gas,G,m3,2024-01-01T00:00:00Z,60,1,s,1,{},3,4"
    ingest(write_delivery(tmp_path / "g1.csv", [PULSE_HEADER, pulse.format("G1", 1), pulse.format("G2", 1)],
                          at("2024-01-01 01:00")))  # fmt: skip
    ingest(write_delivery(tmp_path / "g2.csv", [PULSE_HEADER, pulse.format("G2", 9)], at("2024-01-01 02:00")))
    assert store.con.execute(
        "SELECT meter_id, energy_wh FROM pulse_meter_measurements ORDER BY meter_id"
    ).fetchall() == [("G1", 1.0), ("G2", 9.0)]


# -- property: any processing order gives the table that delivery order gives --------------

READING_KEYS = list(itertools.product([1, 2], ["08:00", "08:15", "08:30"], [15, 60]))

delivery = st.lists(st.tuples(st.sampled_from(READING_KEYS), st.integers(0, 999)), min_size=1, max_size=6)


def write_deliveries(
    folder: Path, deliveries: list[tuple[list[tuple[tuple[int, str, int], int]], int]]
) -> tuple[list[Path], dict[tuple[str, str, int], float | None]]:
    """Write the generated deliveries; return their paths and the table delivery order gives.

    Each file carries one reading of its own so no two files are byte-identical.
    """
    files = []
    for index, (rows, minute) in enumerate(deliveries):
        rows = [*rows, ((100 + index, "09:00", 15), index)]
        lines = [MEASUREMENTS_HEADER] + [
            row(device, f"2024-01-01T{hhmm}:00Z", str(energy), resolution)
            for (device, hhmm, resolution), energy in rows
        ]
        delivered = at("2024-01-01 10:00") + timedelta(minutes=minute)
        path = write_delivery(folder / f"d{index:02d}.csv", lines, delivered)
        files.append((delivered, str(path), rows))
    # The model: apply deliveries in (delivery time, path) order, rows in file order.
    expected: dict[tuple[str, str, int], float | None] = {}
    for _, _, rows in sorted(files, key=lambda f: (f[0], f[1])):
        for (device, hhmm, resolution), energy in rows:
            expected[(str(device), hhmm, resolution)] = float(energy)
    return [Path(p) for _, p, _ in files], expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    deliveries=st.lists(st.tuples(delivery, st.integers(0, 3)), min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_any_processing_order_equals_delivery_order(deliveries, order) -> None:
    """Deliveries may share a delivery time (minute offset 0-3) and repeat keys within a file.

    Each file carries one reading of its own so no two files are byte-identical: a copy of
    content already ingested is a duplicate and changes nothing (see README).
    """
    _check_any_order(deliveries, order)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    deliveries=st.lists(st.tuples(delivery, st.integers(0, 3)), min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_any_processing_order_equals_delivery_order_when_appended_and_settled(deliveries, order) -> None:
    """The same, every file taking the path of files over 128 MiB: appended as read, then settled
    in slices of two rows' time range (its own repeats, then the older of each stored pair)."""
    saved = ingest_module.APPEND_BYTES, ingest_module.CSV_SLICE_ROWS
    ingest_module.APPEND_BYTES, ingest_module.CSV_SLICE_ROWS = 0, 2
    try:
        _check_any_order(deliveries, order)
    finally:
        ingest_module.APPEND_BYTES, ingest_module.CSV_SLICE_ROWS = saved


def _check_any_order(deliveries, order) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shuffled, expected = write_deliveries(folder, deliveries)
        order.shuffle(shuffled)
        with Store(folder / "db.duckdb") as store:
            ingester = Ingester(store)
            outcomes = [ingester.ingest(p) for p in shuffled]
            assert {o.status for o in outcomes} == {"ingested"}
            assert energies(store) == expected
