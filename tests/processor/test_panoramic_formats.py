"""Panoramic export categories: detection from the header, typed values, units, NULLs."""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from processor.headers import normalise
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, PAN42_HEADER, PULSE_HEADER, at, write_delivery


@pytest.mark.parametrize(
    ("raw", "column", "factor"),
    [
        (" measurement_time(UTC)", "measurement_time", 1.0),
        ("MEASUREMENT_TIME(UTC)", "measurement_time", 1.0),
        ("resolution(minutes)", "resolution_minutes", 1.0),
        ("RESOLUTION(min)", "resolution_minutes", 1.0),
        (" ENERGY(KWh)", "energy_wh", 1000.0),
        ("energy (MWh) ", "energy_wh", 1_000_000.0),
        ("reactive power(VAR)", "reactive_power_var", 1.0),
        ("consumed active energy(Wh)", "consumed_active_energy_wh", 1.0),
        ("\ufeffdevice_id", "device_id", 1.0),
        ("Meter_Unit", "meter_unit", 1.0),
    ],
)
def test_header_names_reduce_to_our_columns(raw: str, column: str, factor: float) -> None:
    field = normalise(raw)
    assert (field.column, field.factor) == (column, factor)


def test_measurements_with_spaced_header_quoted_commas_and_na(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(
        tmp_path / "drop" / "Measurements" / "export.csv",
        [
            MEASUREMENTS_HEADER,
            ' 1001 , Chiller 1, 2024-03-01T09:00:00Z, 15, 77, "Plant, North", 12.5, 230, 2875, 0.95, 718.75',
            '1002,"Boiler ""B""",2024-03-01T09:00:00+02:00,"15",77,Plant,N/A,,"100.5",N/A,"25.125"',
        ],
        at("2024-03-01 10:00"),
    )
    outcome = ingest(path)
    assert (outcome.status, outcome.format, outcome.rows) == ("ingested", "panoramic_measurements", 2)
    rows = store.con.execute(
        "SELECT device_id, device_name, measurement_time, resolution_minutes, site_id, site_name, current_a, "
        "voltage_v, power_w, power_factor, energy_wh, file_id, delivered_at, source_line "
        "FROM panoramic_measurements ORDER BY device_id"
    ).fetchall()
    assert rows[0] == (
        "1001", "Chiller 1", at("2024-03-01 09:00"), 15, "77", "Plant, North", 12.5, 230.0, 2875.0, 0.95,
        718.75, outcome.file_id, at("2024-03-01 10:00"), 2,
    )  # fmt: skip
    # +02:00 is converted to UTC; N/A and empty are NULL; quoted numbers are numbers.
    assert rows[1] == (
        "1002", 'Boiler "B"', at("2024-03-01 07:00"), 15, "77", "Plant", None, None, 100.5, None, 25.125,
        outcome.file_id, at("2024-03-01 10:00"), 3,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("line", "name", "site"),
    [
        (
            '1001, "Chiller 1", 2024-03-01T09:00:00Z, 15, 77, "Plant North", 1, 230, 2, 1, 3',
            "Chiller 1",
            "Plant North",
        ),
        ('1001, "Chiller, 1", 2024-03-01T09:00:00Z, 15, 77, Plant, 1, 230, 2, 1, 3', "Chiller, 1", "Plant"),
        ('1001, "Chiller\n1", 2024-03-01T09:00:00Z, 15, 77, Plant, 1, 230, 2, 1, 3', "Chiller\n1", "Plant"),
        (
            '"1001", "Chiller ""1""", 2024-03-01T09:00:00Z, 15, 77, Plant, 1, 230, 2, 1, 3',
            'Chiller "1"',
            "Plant",
        ),
    ],
)
def test_a_quote_after_the_space_opens_a_quoted_field(
    tmp_path: Path, store: Store, ingest, line: str, name: str, site: str
) -> None:
    """Polars takes such a quote for text; whatever the field holds, the block is parsed as CSV means."""
    plain = "1002,Boiler,2024-03-01T09:00:00Z,15,77,Plant,1,230,2,1,3"
    outcome = ingest(
        write_delivery(tmp_path / "q.csv", [MEASUREMENTS_HEADER, plain, line, plain.replace("1002", "1003")])
    )
    assert (outcome.status, outcome.rows) == ("ingested", 3), outcome.detail
    got = store.con.execute(
        "SELECT device_name, site_name, source_line FROM panoramic_measurements WHERE device_id = '1001'"
    ).fetchall()
    assert got == [(name, site, 3)]


@pytest.mark.parametrize(
    "first",
    ["2024-03-01T09:00:00Z", "2024-03-01T11:00:00+02:00", "2024-03-01 09:00:00", "2024-03-01T09:00"],
)
def test_every_time_form_gives_the_same_instants_whichever_comes_first(
    tmp_path: Path, store: Store, ingest, first: str
) -> None:
    """The vendor's ``...Z`` form takes a fast path; a file that mixes forms falls back to all of them."""
    forms = ["2024-03-01T09:00:00Z", "2024-03-01T09:00:00.000Z", "2024-03-01T11:00:00+02:00",
             "2024-03-01 09:00:00", "2024-03-01T09:00", "2024-03-01T04:00:00-05:00"]  # fmt: skip
    times = [first, *forms]
    lines = [MEASUREMENTS_HEADER] + [f"{i},d,{t},15,1,s,1,230,1,1,1" for i, t in enumerate(times)]
    assert ingest(write_delivery(tmp_path / "times.csv", lines)).rows == len(times)
    got = store.con.execute("SELECT DISTINCT measurement_time FROM panoramic_measurements").fetchall()
    assert got == [(at("2024-03-01 09:00"),)]


def test_a_bad_time_after_vendor_times_names_its_line(tmp_path: Path, ingest) -> None:
    lines = [MEASUREMENTS_HEADER, "1,d,2024-03-01T09:00:00Z,15,1,s,1,230,1,1,1",
             "2,d,2024-03-01T09:15:00Z,15,1,s,1,230,1,1,1", "3,d,2024-03-01T25:00:00Z,15,1,s,1,230,1,1,1"]  # fmt: skip
    outcome = ingest(write_delivery(tmp_path / "bad.csv", lines))
    assert outcome.status == "rejected"
    assert (
        outcome.detail == "line 4: measurement_time(UTC) value '2024-03-01T25:00:00Z' is not a date and time"
    )


def test_whole_numbers_written_as_decimals_are_accepted_after_plain_ones(
    tmp_path: Path, store: Store, ingest
) -> None:
    """Resolutions cast straight to integers first; ``15.0`` further down sends the block the full way."""
    lines = [MEASUREMENTS_HEADER, "1,a,2024-01-01T00:00:00Z,15,1,s,1,230,1,1,1",
             "2,b,2024-01-01T00:00:00Z,015,1,s,1,230,1,1,1", "3,c,2024-01-01T00:00:00Z,15.0,1,s,1,230,1,1,1",
             "4,d,2024-01-01T00:00:00Z,1.5e1,1,s,1,230,1,1,1"]  # fmt: skip
    assert ingest(write_delivery(tmp_path / "res.csv", lines)).status == "ingested"
    got = store.con.execute(
        "SELECT resolution_minutes FROM panoramic_measurements ORDER BY device_id"
    ).fetchall()
    assert got == [(15,)] * 4


def test_the_quick_typing_never_accepts_what_the_full_typing_refuses() -> None:
    """``_typed(quick=True)`` is only a shortcut: any value it turns into a number, the full path
    turns into the same number (what it cannot type, ``_lost`` sends the full way)."""
    from processor import panoramic
    from tests.processor.fuzzing import BAD_NUMBERS

    values = [*BAD_NUMBERS, "15", "015", "15.0", "-0", "1e1", "2147483647", "-2147483648", "0.1", "3e-5"]
    raw = pl.DataFrame({"v": values})
    for kind in ("int", "float"):
        column = panoramic.Column("v", kind)
        quick, full = (
            raw.select(panoramic._typed(column, pl.col("v"), 1.0, None, quick=q)).to_series().to_list()
            for q in (True, False)
        )
        for value, q, f in zip(values, quick, full, strict=True):
            if q is not None and math.isfinite(q):
                assert q == f, (kind, value, q, f)


def test_energy_in_kwh_and_mwh_is_stored_in_wh(tmp_path: Path, store: Store, ingest) -> None:
    kwh = MEASUREMENTS_HEADER.replace("energy(Wh)", "ENERGY(KWh)").replace("power(W)", "POWER(kW)")
    mwh = MEASUREMENTS_HEADER.replace("energy(Wh)", "ENERGY(MWh)")
    ingest(write_delivery(tmp_path / "a.csv", [kwh, "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,1.5,1,2.5"]))
    ingest(write_delivery(tmp_path / "b.csv", [mwh, "2,b,2024-01-01T00:00:00Z,60,1,s,1,230,7,1,0.25"]))
    # Values whose product carries binary noise (1.005 * 1000 is 1004.9999999999999 in doubles),
    # on the quick typing path and, with a resolution written 60.0, on the full one.
    ingest(write_delivery(tmp_path / "c.csv", [kwh, "3,c,2024-01-01T00:00:00Z,60,1,s,1,230,1.005,1,1.005"]))
    ingest(write_delivery(tmp_path / "d.csv", [mwh, "4,d,2024-01-01T00:00:00Z,60.0,1,s,1,230,1.1,1,33.3"]))
    got = store.con.execute(
        "SELECT device_id, power_w, energy_wh FROM panoramic_measurements ORDER BY device_id"
    ).fetchall()
    assert got == [
        ("1", 1500.0, 2500.0),
        ("2", 7.0, 250000.0),
        ("3", 1005.0, 1005.0),
        ("4", 1.1, 33300000.0),
    ]


def test_pan42_rows_are_kept_per_phase(tmp_path: Path, store: Store, ingest) -> None:
    lines = [PAN42_HEADER] + [
        f"9,Main meter,2024-05-01T00:00:00Z,1,3,HQ,{phase},10,400,4000,0.9,66.6,120,123456.5,50.01"
        for phase in "RST"
    ]
    outcome = ingest(write_delivery(tmp_path / "pan42.csv", lines))
    assert (outcome.status, outcome.format, outcome.rows) == ("ingested", "pan42_measurements", 3)
    got = store.con.execute(
        "SELECT phase, reactive_power_var, consumed_active_energy_wh, frequency_hz FROM pan42_measurements "
        "ORDER BY phase"
    ).fetchall()
    assert got == [(p, 120.0, 123456.5, 50.01) for p in "RST"]


def test_pan42_without_frequency_column_is_still_pan42(tmp_path: Path, store: Store, ingest) -> None:
    header = PAN42_HEADER.replace(", frequency(Hz)", "")
    outcome = ingest(
        write_delivery(tmp_path / "p.csv", [header, "9,M,2024-05-01T00:00:00Z,60,3,HQ,R,1,2,3,4,5,6,7"])
    )
    assert outcome.format == "pan42_measurements"
    assert store.con.execute("SELECT frequency_hz FROM pan42_measurements").fetchall() == [(None,)]


@pytest.mark.parametrize("upper", [False, True])
def test_pulse_meter_measurements_in_either_case(tmp_path: Path, store: Store, ingest, upper: bool) -> None:
    header = PULSE_HEADER.upper() if upper else PULSE_HEADER
    outcome = ingest(
        write_delivery(
            tmp_path / "pulse.csv",
            [header, 'W-1,Water,Main water,m3,2024-02-01T10:00:00Z,60,5,Depot,N/A,N/A,"1.25","192000.01"'],
        )
    )
    assert (outcome.status, outcome.format) == ("ingested", "pulse_meter_measurements")
    got = store.con.execute(
        "SELECT meter_id, meter_type, meter_unit, power_w, energy_wh, flow, volume FROM pulse_meter_measurements"
    ).fetchall()
    assert got == [("W-1", "Water", "m3", None, None, 1.25, 192000.01)]


def test_catalog_keeps_every_column_one_row_per_entity_per_day(tmp_path: Path, store: Store, ingest) -> None:
    header = "id, name, type, panel_id, panel_name, site_id, site_name, device_category, future_column"
    first = write_delivery(
        tmp_path / "catalog1.csv",
        [header, "11,Chiller,device,P1,Panel 1,S1,Site,HVAC,x", "S1,Site,site,,,,,,"],
        at("2024-06-01 01:00"),
    )
    same_day_later = write_delivery(
        tmp_path / "catalog2.csv",
        [header, "11,Chiller renamed,device,P1,Panel 1,S1,Site,HVAC,y"],
        at("2024-06-01 05:00"),
    )
    next_day = write_delivery(
        tmp_path / "catalog3.csv",
        [header, "11,Chiller,device,P2,Panel 2,S1,Site,HVAC,z"],
        at("2024-06-02 01:00"),
    )
    for path in (same_day_later, first, next_day):  # processing order must not matter
        assert ingest(path).status == "ingested"
    got = store.con.execute(
        "SELECT entity_kind, entity_id, snapshot_date, catalog_version, name, panel_id, future_column "
        "FROM panoramic_catalog ORDER BY snapshot_date, entity_kind"
    ).fetchall()
    assert got == [
        ("device", "11", date(2024, 6, 1), "1.0", "Chiller renamed", "P1", "y"),
        ("site", "S1", date(2024, 6, 1), "1.0", "Site", None, None),
        ("device", "11", date(2024, 6, 2), "1.0", "Chiller", "P2", "z"),
    ]


def test_catalog_v11_is_told_by_its_account_columns(tmp_path: Path, store: Store, ingest) -> None:
    header = "account_id,account_name,site_id,site_name,site_type,device_id,device_name,device_type"
    outcome = ingest(write_delivery(tmp_path / "c.csv", [header, "A1,Acme,S1,HQ,office,D1,Fan,sensor"]))
    assert outcome.format == "panoramic_catalog"
    assert store.con.execute(
        "SELECT entity_kind, entity_id, catalog_version, account_name, device_type FROM panoramic_catalog"
    ).fetchall() == [("device", "D1", "1.1", "Acme", "sensor")]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"a,b,c\n1,2,3\n", "unrecognised format: CSV header [a, b, c] is not a known export"),
        (b"", "unrecognised format: empty file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "unrecognised format: binary data (starts with 89 50 4e 47"),
        (b"just some notes\nnothing else\n", "unrecognised format: CSV header [just some notes]"),
        (b"\xff\xfe\xfd\n", "unrecognised format: first line is not UTF-8 text"),
    ],
)
def test_unrecognised_files_are_rejected_naming_what_was_seen(
    tmp_path: Path, store: Store, ingest, content: bytes, reason: str
) -> None:
    path = tmp_path / "mystery.csv"
    path.write_bytes(content)
    outcome = ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail is not None and outcome.detail.startswith(reason)
    status, error = store.con.execute(
        "SELECT status, error FROM files WHERE path = ?", [str(path)]
    ).fetchone()
    assert (status, error) == ("rejected", outcome.detail)


def test_format_comes_from_the_header_not_the_name(tmp_path: Path, ingest) -> None:
    outcome = ingest(
        write_delivery(
            tmp_path / "catalog.txt", [PULSE_HEADER, "M,Gas,G,m3,2024-01-01T00:00:00Z,60,1,s,1,2,3,4"]
        )
    )
    assert outcome.format == "pulse_meter_measurements"


def test_unknown_columns_are_reported_not_silently_dropped(tmp_path: Path, store: Store, ingest) -> None:
    outcome = ingest(
        write_delivery(
            tmp_path / "m.csv",
            [MEASUREMENTS_HEADER + ", humidity(%)", "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3,55"],
        )
    )
    assert outcome.status == "ingested"
    assert outcome.detail == "ignored columns not in Measurements: humidity(%)"
    assert store.con.execute("SELECT note FROM files").fetchone() == (outcome.detail,)


def test_crlf_and_bom_are_accepted(tmp_path: Path, store: Store, ingest) -> None:
    path = tmp_path / "win.csv"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + (MEASUREMENTS_HEADER + "\r\n1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3.5\r\n").encode()
    )
    assert ingest(path).status == "ingested"
    assert store.con.execute("SELECT device_id, energy_wh FROM panoramic_measurements").fetchall() == [
        ("1", 3.5)
    ]
