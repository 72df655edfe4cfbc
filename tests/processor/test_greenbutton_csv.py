"""Utility CSV downloads (formats.md section 3): every layout, DST, time zones, rejections.

Fixtures under fixtures/greenbutton_csv are small hand-written files in each utility's
layout; the SCE file is the real sample in /work/shared, read in place.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import polars as pl
import pytest

from processor.errors import Rejected
from processor.greenbutton.model import INTERVAL_KEY, INTERVAL_SCHEMA
from processor.greenbutton.utility_csv import UtilityCsv, detect_utility_csv, parse_utility_csv

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "greenbutton_csv"
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "samples" / "greenbutton"
SCE_SAMPLE = SAMPLES / "SCE-NEMFILE.csv"

PGE_PREAMBLE = [
    "Name,JOHN DOE",
    'Address,"123 MAIN ST, SAN JOSE CA 95124"',
    "Account Number,1234567890",
    "Service,Service 1",
    "",
]
HEADER_UNITS = "TYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES"


def utc(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parse(data: bytes | str, **kwargs: str) -> UtilityCsv:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    result = parse_utility_csv(raw, **kwargs)
    assert result.intervals.schema == pl.Schema(INTERVAL_SCHEMA)
    return result


def lines(*rows: str) -> str:
    return "\n".join(rows) + "\n"


def rows(result: UtilityCsv, *columns: str) -> list[tuple[object, ...]]:
    return result.intervals.select(columns).rows()


def assert_keys_unique(result: UtilityCsv) -> None:
    frame = result.intervals
    assert frame.select(INTERVAL_KEY).unique().height == frame.height


def assert_contiguous(result: UtilityCsv) -> None:
    """Each interval ends where the next one starts: nothing lost, nothing overlapping."""
    spans = result.intervals.sort("interval_start").select("interval_start", "duration_s").rows()
    for (start, duration), (next_start, _) in pairwise(spans):
        assert (next_start - start).total_seconds() == duration, (start, duration, next_start)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("pge_electric_usage_units.csv", "opower"),
        ("pge_electric_usage_kwh.csv", "opower"),
        ("pge_electric_import_export.csv", "opower"),
        ("pge_gas_daily.csv", "opower"),
        ("pge_gas_daily_therms.csv", "opower"),
        ("peco_electric.csv", "peco_pse"),
        ("seattle_city_light.csv", "seattle"),
        ("avangrid.csv", "avangrid"),
        ("sdge_electric.csv", "sdge"),
    ],
)
def test_detect_by_content(name: str, layout: str) -> None:
    head = fixture(name)[: 64 * 1024].decode("utf-8").removeprefix("\ufeff")
    assert detect_utility_csv(head) == layout


def test_detect_sce_sample_from_its_first_64_kib() -> None:
    head = SCE_SAMPLE.read_bytes()[: 64 * 1024].decode("utf-8", errors="ignore")
    assert detect_utility_csv(head) == "sce"


@pytest.mark.parametrize(
    "head",
    [
        "device_id, device_name, measurement_time(UTC), resolution(minutes)\n1,a,2024-01-01T00:00:00Z,60\n",
        "TYPE,START DATE,END DATE,USAGE,UNITS,COST,NOTES\n",  # a bill summary, not intervals
        "Name,JOHN DOE\nAccount Number,1\n\nTYPE,DATE,START TI",  # header cut off at the 64 KiB mark
        "",
        "just some text\n",
    ],
)
def test_detect_rejects_other_files(head: str) -> None:
    assert detect_utility_csv(head) is None


def test_not_a_utility_csv_is_rejected() -> None:
    with pytest.raises(Rejected) as info:
        parse_utility_csv(b"a,b,c\n1,2,3\n", fallback_timezone="UTC")
    assert "not a known utility CSV download" in info.value.reason
    assert info.value.format_name == "greenbutton_csv"


# --------------------------------------------------------------------------- PG&E / Opower


def test_pge_usage_and_units_header_with_bom_costs_and_estimate() -> None:
    result = parse(fixture("pge_electric_usage_units.csv"))
    assert result.layout == "opower"
    assert result.timezone == "America/Los_Angeles"  # PG&E: a California address, no zone given
    columns = (
        "interval_start", "duration_s", "value", "raw_value", "power_of_ten_multiplier",
        "cost", "currency", "quality", "source_line",
    )  # fmt: skip
    assert rows(result, *columns) == [
        # 2025-03-20 is PDT (UTC-7); the BOM does not shift line numbers
        (utc("2025-03-20 07:00"), 3600, 2940.0, 2.94, 3, 1.02, "USD", None, 7),
        (utc("2025-03-20 08:00"), 3600, 500.0, 0.50, 3, -0.50, "USD", None, 8),
        (utc("2025-03-20 09:00"), 3600, 1234500.0, 1234.5, 3, 1234.50, "USD", None, 9),
        (utc("2025-03-20 10:00"), 3600, 710.0, 0.71, 3, 0.25, "USD", "estimated", 10),
        (utc("2025-03-20 11:00"), 3600, 0.0, 0.0, 3, None, None, None, 11),
    ]
    assert set(rows(result, "usage_point", "reading_type", "service_kind", "flow_direction", "uom")) == {
        ("opower:1234567890:Service 1", "csv:electricity:flow1:Wh:PT1H", "electricity", 1, "Wh")
    }


def test_pge_usage_kwh_header_crlf_us_dates_and_15_minute_rows() -> None:
    result = parse(fixture("pge_electric_usage_kwh.csv"))
    assert result.layout == "opower"
    assert rows(result, "interval_start", "duration_s", "value", "cost", "source_line") == [
        (utc("2025-07-02 07:00"), 900, 380.0, 0.12, 7),
        (utc("2025-07-02 07:15"), 900, 400.0, 0.13, 8),
        (utc("2025-07-02 07:30"), 900, 410.0, 0.13, 9),
        (utc("2025-07-02 07:45"), 900, 390.0, 0.12, 10),
    ]
    assert result.intervals["reading_type"].unique().to_list() == ["csv:electricity:flow1:Wh:PT15M"]
    assert result.intervals["usage_point"].unique().to_list() == ["opower:2222222222:Service 2"]


def test_pge_import_export_header_gives_two_flows_per_row() -> None:
    result = parse(fixture("pge_electric_import_export.csv"))
    assert result.layout == "opower"
    columns = ("interval_start", "flow_direction", "reading_type", "value", "cost", "currency", "source_line")
    assert rows(result, *columns) == [
        (utc("2025-06-01 19:00"), 1, "csv:electricity:flow1:Wh:PT1H", 100.0, -0.60, "USD", 7),
        (utc("2025-06-01 19:00"), 19, "csv:electricity:flow19:Wh:PT1H", 2500.0, None, None, 7),
        (utc("2025-06-01 20:00"), 1, "csv:electricity:flow1:Wh:PT1H", 0.0, -0.75, "USD", 8),
        (utc("2025-06-01 20:00"), 19, "csv:electricity:flow19:Wh:PT1H", 3100.0, None, None, 8),
        (utc("2025-06-01 21:00"), 1, "csv:electricity:flow1:Wh:PT1H", 1200.0, 0.30, "USD", 9),
        (utc("2025-06-01 21:00"), 19, "csv:electricity:flow19:Wh:PT1H", 0.0, None, None, 9),
    ]
    # the row's cost is counted once, on the import row
    assert result.intervals["cost"].sum() == pytest.approx(-1.05)
    assert_keys_unique(result)


def test_pge_daily_gas_with_units_column_follows_local_days() -> None:
    result = parse(fixture("pge_gas_daily.csv"))
    columns = ("interval_start", "duration_s", "value", "uom", "power_of_ten_multiplier", "service_kind")
    assert rows(result, *columns) == [
        (utc("2025-11-01 07:00"), 86400, 1.02, "therm", 0, "gas"),
        (utc("2025-11-02 07:00"), 90000, 1.50, "therm", 0, "gas"),  # fall-back day: 25 hours
        (utc("2025-11-03 08:00"), 86400, 0.98, "therm", 0, "gas"),
    ]
    assert result.intervals["reading_type"].unique().to_list() == ["csv:gas:flow1:therm:P1D"]
    assert result.intervals["usage_point"].unique().to_list() == ["opower:1234567890:Service 2"]
    assert_contiguous(result)


def test_pge_daily_gas_with_therms_in_the_header() -> None:
    result = parse(fixture("pge_gas_daily_therms.csv"))
    assert rows(result, "interval_start", "duration_s", "value", "uom", "cost", "source_line") == [
        (utc("2025-03-08 08:00"), 86400, 2.00, "therm", 4.00, 7),
        (utc("2025-03-09 08:00"), 82800, 2.10, "therm", 4.20, 8),  # spring day: 23 hours
    ]


def test_ccf_becomes_cubic_feet_and_water_is_recognised() -> None:
    text = lines(
        *PGE_PREAMBLE,
        "TYPE,DATE,USAGE,UNITS,COST,NOTES",
        "Natural gas usage,2025-01-10,1.5,CCF,$2.00,",
        "Water usage,2025-01-10,2.25,CCF,$1.00,",
        "Water usage,2025-01-11,300,gallons,$1.00,",
    )
    result = parse(text)
    columns = ("service_kind", "uom", "value", "raw_value", "power_of_ten_multiplier", "reading_type")
    assert rows(result, *columns) == [
        ("gas", "ft3", 150.0, 1.5, 2, "csv:gas:flow1:ft3:P1D"),
        ("water", "ft3", 225.0, 2.25, 2, "csv:water:flow1:ft3:P1D"),
        ("water", "gal", 300.0, 300.0, 0, "csv:water:flow1:gal:P1D"),
    ]


def test_two_downloads_of_one_account_share_their_keys() -> None:
    """Header variants of the same account must land on the same series so newer rows win."""
    first = parse(lines(*PGE_PREAMBLE, HEADER_UNITS, "Electric usage,2025-03-20,00:00,00:59,2.94,kWh,$1.02,"))
    second = parse(
        lines(
            *PGE_PREAMBLE,
            "TYPE,DATE,START TIME,END TIME,USAGE (kWh),COST,NOTES",
            "Electric usage,3/20/2025,0:00,0:59,3.10,$1.10,",
        )
    )
    assert first.intervals.select(INTERVAL_KEY).rows() == second.intervals.select(INTERVAL_KEY).rows()
    assert first.intervals["value"].to_list() != second.intervals["value"].to_list()


def test_exclusive_end_times_give_the_same_interval_as_inclusive_ones() -> None:
    result = parse(
        lines(
            *PGE_PREAMBLE,
            HEADER_UNITS,
            "Electric usage,2025-03-20,00:00,00:59,1,kWh,,",
            "Electric usage,2025-03-20,01:00,02:00,1,kWh,,",
            "Electric usage,2025-03-20,02:00,02:59:59,1,kWh,,",
            "Electric usage,2025-03-20,23:00,23:59,1,kWh,,",
        )
    )
    assert result.intervals["duration_s"].to_list() == [3600, 3600, 3600, 3600]


@pytest.mark.parametrize(
    ("note", "quality"),
    [
        ("", None),
        ("* This data was estimated", "estimated"),
        ("Estimated", "estimated"),
        ("Actual", "valid"),
        ("Validated", "validated"),
        ("Edited", "edited"),
        ("invalid reading", None),
        ("bill credit applied", None),
    ],
)
def test_notes_give_the_reading_quality(note: str, quality: str | None) -> None:
    result = parse(lines(*PGE_PREAMBLE, HEADER_UNITS, f"Electric usage,2025-03-20,00:00,00:59,1,kWh,,{note}"))
    assert result.intervals["quality"].to_list() == [quality]


# --------------------------------------------------------------------------- PECO / PSE, Seattle


def test_peco_pse_layout_uses_the_fallback_zone() -> None:
    result = parse(fixture("peco_electric.csv"), fallback_timezone="America/New_York")
    assert result.layout == "peco_pse"
    assert result.timezone == "America/New_York"
    columns = ("interval_start", "duration_s", "value", "cost", "currency", "quality", "source_line")
    assert rows(result, *columns) == [
        (utc("2025-01-15 05:00"), 3600, 840.0, None, None, None, 7),
        (utc("2025-01-15 06:00"), 3600, 770.0, None, None, None, 8),
        # line 9 has an empty USAGE: no reading, no row
        (utc("2025-01-15 08:00"), 3600, 650.0, None, None, "estimated", 10),
    ]
    assert result.intervals["usage_point"].unique().to_list() == ["opower:5555555555:Service 1"]


def test_seattle_import_export_without_preamble() -> None:
    result = parse(fixture("seattle_city_light.csv"), fallback_timezone="America/Los_Angeles")
    assert result.layout == "seattle"
    assert rows(result, "usage_point", "flow_direction", "interval_start", "duration_s", "value") == [
        ("seattle", 1, utc("2025-07-04 18:00"), 3600, 200.0),
        ("seattle", 19, utc("2025-07-04 18:00"), 3600, 1350.0),
        ("seattle", 1, utc("2025-07-04 19:00"), 3600, 50.0),
        ("seattle", 19, utc("2025-07-04 19:00"), 3600, 1800.0),
    ]


# --------------------------------------------------------------------------- Avangrid


def test_avangrid_uses_the_offsets_in_its_rows() -> None:
    result = parse(fixture("avangrid.csv"))
    assert result.layout == "avangrid"
    assert result.timezone == "offset"
    columns = ("usage_point", "reading_type", "interval_start", "duration_s", "value", "cost", "source_line")
    assert rows(result, *columns) == [
        ("avangrid:7000123:Service 1", "csv:electricity:flow1:Wh:PT1H", utc("2026-01-01 05:00"), 3600, 1250.0, 0.21, 2),
        ("avangrid:7000123:Service 1", "csv:electricity:flow1:Wh:PT1H", utc("2026-01-01 06:00"), 3600, 1100.0, 0.19, 3),
        ("avangrid:7000123:Service 2", "csv:gas:flow1:therm:P1D", utc("2026-01-01 05:00"), 86400, 3.4, 4.08, 4),
    ]  # fmt: skip


def test_avangrid_offsets_win_over_a_given_zone_which_is_recorded() -> None:
    plain = parse(fixture("avangrid.csv"))
    zoned = parse(fixture("avangrid.csv"), timezone="Asia/Tokyo", fallback_timezone="Europe/Berlin")
    assert zoned.timezone == "Asia/Tokyo"
    assert zoned.intervals.equals(plain.intervals)


def test_avangrid_fall_back_day_by_offsets() -> None:
    lead = 'JANE DOE,"1 MAIN ST",7000123,Service 1,Electric usage,2025-11-02'
    result = parse(
        lines(
            "Name,Address,Account Number,Service,Type,Date,Start Time,End Time,Usage,Units,Costs,Weather",
            f"{lead},2025-11-02 01:00:00-04:00,2025-11-02 01:59:59-04:00,1,kWh,,",
            f"{lead},2025-11-02 01:00:00-05:00,2025-11-02 01:59:59-05:00,2,kWh,,",
            f"{lead},2025-11-02 00:00:00-04:00,2025-11-02 23:59:59-05:00,30,kWh,,",
        )
    )
    assert rows(result, "interval_start", "duration_s", "reading_type") == [
        (utc("2025-11-02 05:00"), 3600, "csv:electricity:flow1:Wh:PT1H"),
        (utc("2025-11-02 06:00"), 3600, "csv:electricity:flow1:Wh:PT1H"),
        (utc("2025-11-02 04:00"), 90000, "csv:electricity:flow1:Wh:P1D"),
    ]


# --------------------------------------------------------------------------- SDG&E


def test_sdge_meter_layout() -> None:
    result = parse(fixture("sdge_electric.csv"), fallback_timezone="Europe/Berlin")
    assert result.layout == "sdge"
    assert result.timezone == "America/Los_Angeles"
    columns = (
        "flow_direction",
        "reading_type",
        "interval_start",
        "duration_s",
        "value",
        "raw_value",
        "source_line",
    )
    assert rows(result, *columns) == [
        (1, "csv:electricity:flow1:Wh:PT15M", utc("2025-01-01 08:00"), 900, 55.0, 0.055, 15),
        (19, "csv:electricity:flow19:Wh:PT15M", utc("2025-01-01 08:00"), 900, 0.0, 0.0, 15),
        (4, "csv:electricity:flow4:Wh:PT15M", utc("2025-01-01 08:00"), 900, 55.0, 0.055, 15),
        (1, "csv:electricity:flow1:Wh:PT15M", utc("2025-01-01 08:15"), 900, 45.0, 0.045, 16),
        # line 16 has an empty Generation cell: no export row
        (4, "csv:electricity:flow4:Wh:PT15M", utc("2025-01-01 08:15"), 900, 45.0, 0.045, 16),
        (1, "csv:electricity:flow1:Wh:PT15M", utc("2025-01-01 20:30"), 900, 0.0, 0.0, 17),
        (19, "csv:electricity:flow19:Wh:PT15M", utc("2025-01-01 20:30"), 900, 250.0, 0.25, 17),
        (4, "csv:electricity:flow4:Wh:PT15M", utc("2025-01-01 20:30"), 900, -250.0, -0.25, 17),
        (1, "csv:electricity:flow1:Wh:PT15M", utc("2025-01-01 20:45"), 900, 100.0, 0.1, 18),
        (19, "csv:electricity:flow19:Wh:PT15M", utc("2025-01-01 20:45"), 900, 50.0, 0.05, 18),
        (4, "csv:electricity:flow4:Wh:PT15M", utc("2025-01-01 20:45"), 900, 50.0, 0.05, 18),
    ]  # fmt: skip
    assert result.intervals["usage_point"].unique().to_list() == ["sdge:12341234"]
    assert result.intervals["cost"].is_null().all()


SDGE_HEAD = [
    "Resource,Electric",
    "Meter Number,9",
    "UOM,kWh",
    "Meter Number,Date,Start Time,Duration,Consumption",
]


def test_sdge_writes_the_repeated_fall_back_quarter_hours_twice() -> None:
    quarters = ["12:45 AM", "1:00 AM", "1:15 AM", "1:30 AM", "1:45 AM"] * 1
    quarters += ["1:00 AM", "1:15 AM", "1:30 AM", "1:45 AM", "2:00 AM"]
    body = [f'"9","11/2/25","{q}","15","0.1"' for q in quarters]  # two-digit year, as SDG&E writes
    result = parse(lines(*SDGE_HEAD, *body))
    starts = result.intervals["interval_start"].to_list()
    assert starts == [
        utc("2025-11-02 07:45"),
        utc("2025-11-02 08:00"),  # 1:00 AM PDT
        utc("2025-11-02 08:15"),
        utc("2025-11-02 08:30"),
        utc("2025-11-02 08:45"),
        utc("2025-11-02 09:00"),  # 1:00 AM PST
        utc("2025-11-02 09:15"),
        utc("2025-11-02 09:30"),
        utc("2025-11-02 09:45"),
        utc("2025-11-02 10:00"),
    ]
    assert result.intervals["duration_s"].unique().to_list() == [900]


def test_sdge_daily_gas_in_therms() -> None:
    result = parse(
        lines(
            "Resource,Gas",
            "Meter Number,1",
            "Interval UOM,Day",
            "UOM,Therms",
            "Meter Number,Date,Start Time,Duration,Consumption",
            '"1","3/8/2025","6:59 AM","Day","1.2345"',
            '"1","3/9/2025","6:59 AM","Day","1.5000"',
        )
    )
    assert rows(result, "reading_type", "interval_start", "duration_s", "value") == [
        # 6:59 PST to 6:59 PDT: the gas day that holds the spring-forward jump is 23 hours
        ("csv:gas:flow1:therm:P1D", utc("2025-03-08 14:59"), 82800, 1.2345),
        ("csv:gas:flow1:therm:P1D", utc("2025-03-09 13:59"), 86400, 1.5),
    ]


# --------------------------------------------------------------------------- SCE (real sample)


def sce_expected() -> list[tuple[int, str, str, float]]:
    """(line, direction, start text, kWh) for every data row, read with the csv module."""
    found = []
    direction = None
    text = SCE_SAMPLE.read_bytes().decode("utf-8")
    for number, line in enumerate(text.split("\r\n"), start=1):
        cells = next(csv.reader([line]), [])
        if not cells:
            continue
        first = " ".join(cells[0].split())  # the sample puts NBSPs inside its cells
        if first == "Energy Delivered time period":
            direction = "delivered"
        elif first == "Energy Received time period":
            direction = "received"
        elif len(cells) == 3 and " to " in first:
            assert direction is not None
            found.append((number, direction, first.split(" to ")[0], float(cells[1])))
    return found


def test_sce_sample() -> None:
    expected = sce_expected()
    delivered = [row for row in expected if row[1] == "delivered"]
    received = [row for row in expected if row[1] == "received"]
    assert len(delivered) == len(received) > 1000

    result = parse(SCE_SAMPLE.read_bytes(), fallback_timezone="Europe/Berlin")
    frame = result.intervals
    assert result.layout == "sce"
    assert result.timezone == "America/Los_Angeles"
    assert frame.filter(pl.col("flow_direction") == 1).height == len(delivered)
    assert frame.filter(pl.col("flow_direction") == 19).height == len(received)
    assert frame.height == len(expected)
    assert frame["source_line"].to_list() == [row[0] for row in expected]

    first_day = [row[3] for row in delivered if row[2].startswith("2022-08-01 ")]
    assert len(first_day) == 96
    day = frame.filter(
        (pl.col("flow_direction") == 1)
        & (pl.col("interval_start") >= utc("2022-08-01 07:00"))  # local midnight, PDT
        & (pl.col("interval_start") < utc("2022-08-02 07:00"))
    )
    assert day.height == 96
    assert day["raw_value"].sum() == pytest.approx(sum(first_day))
    assert day["value"].sum() == pytest.approx(sum(first_day) * 1000)

    first = frame.row(0, named=True)
    assert first["interval_start"] == utc("2022-08-01 07:00")
    assert first["duration_s"] == 900
    assert first["raw_value"] == delivered[0][3]
    assert (first["usage_point"], first["reading_type"]) == (
        "sce:XXXXXXXXXX",
        "csv:electricity:flow1:Wh:PT15M",
    )
    assert set(frame["reading_type"]) == {"csv:electricity:flow1:Wh:PT15M", "csv:electricity:flow19:Wh:PT15M"}
    assert frame["quality"].is_null().all()  # the sample leaves "Reading quality" empty
    assert_keys_unique(result)


def test_sce_quality_and_crlf_in_a_small_file() -> None:
    text = "\r\n".join(
        [
            "Energy Usage Information",
            '"For location: 8001234567"',
            "",
            '"Data for period starting: 2022-08-01 00:00:00\u00a0 for 24 hours"',
            "Energy\u00a0 Delivered time period,Usage\u00a0Delivered(Real energy in kilowatt-hours),Reading quality",
            '"2022-08-01 00:00:00\u00a0to 2022-08-01 00:15:00","0.380","Estimated"',
            '"2022-08-01 00:15:00\u00a0to 2022-08-01 00:30:00","0.400","Actual"',
        ]
    )
    result = parse(text)
    assert rows(result, "usage_point", "interval_start", "value", "quality", "source_line") == [
        ("sce:8001234567", utc("2022-08-01 07:00"), 380.0, "estimated", 6),
        ("sce:8001234567", utc("2022-08-01 07:15"), 400.0, "valid", 7),
    ]


# --------------------------------------------------------------------------- daylight saving


def pge_day(day: str, starts: list[str], interval_minutes: int = 60) -> str:
    body = []
    for number, start in enumerate(starts, start=1):
        hour, minute = (int(part) for part in start.split(":"))
        end_minutes = hour * 60 + minute + interval_minutes - 1
        end = f"{end_minutes // 60:02d}:{end_minutes % 60:02d}"
        body.append(f"Electric usage,{day},{start},{end},{number},kWh,,")
    return lines(*PGE_PREAMBLE, HEADER_UNITS, *body)


HOURS = [f"{hour:02d}:00" for hour in range(24)]


def test_fall_back_day_with_both_one_oclock_hours_summed_into_one_row() -> None:
    result = parse(pge_day("2025-11-02", HOURS))
    frame = result.intervals
    assert frame.height == 24
    summed = frame.filter(pl.col("source_line") == 8).row(0, named=True)  # the 01:00,01:59 row
    assert (summed["interval_start"], summed["duration_s"], summed["raw_value"]) == (
        utc("2025-11-02 08:00"),
        7200,
        2.0,
    )
    assert summed["reading_type"] == "csv:electricity:flow1:Wh:PT1H"
    assert rows(result, "interval_start", "duration_s")[:4] == [
        (utc("2025-11-02 07:00"), 3600),  # 00:00 PDT
        (utc("2025-11-02 08:00"), 7200),  # 01:00 PDT through 01:59 PST
        (utc("2025-11-02 10:00"), 3600),  # 02:00 PST
        (utc("2025-11-02 11:00"), 3600),
    ]
    assert frame["duration_s"].sum() == 90000
    assert_contiguous(result)
    assert_keys_unique(result)


def test_fall_back_day_with_the_one_oclock_hour_written_twice() -> None:
    result = parse(pge_day("2025-11-02", [*HOURS[:2], "01:00", *HOURS[2:]]))
    assert result.intervals.height == 25
    assert rows(result, "interval_start", "duration_s", "raw_value")[1:4] == [
        (utc("2025-11-02 08:00"), 3600, 2.0),  # first 01:00: PDT
        (utc("2025-11-02 09:00"), 3600, 3.0),  # second 01:00: PST
        (utc("2025-11-02 10:00"), 3600, 4.0),  # 02:00 PST
    ]
    assert result.intervals["duration_s"].sum() == 90000
    assert_contiguous(result)
    assert_keys_unique(result)


def test_fall_back_day_summed_quarter_hours_keep_their_start() -> None:
    quarters = [f"{h:02d}:{m:02d}" for h in range(3) for m in (0, 15, 30, 45)]
    result = parse(pge_day("2025-11-02", quarters, interval_minutes=15))
    one_oclock = result.intervals.filter(pl.col("raw_value").is_between(5, 8))  # 01:00 to 01:45
    assert one_oclock.select("interval_start", "duration_s").rows() == [
        (utc("2025-11-02 08:00"), 4500),
        (utc("2025-11-02 08:15"), 4500),
        (utc("2025-11-02 08:30"), 4500),
        (utc("2025-11-02 08:45"), 4500),
    ]
    assert_keys_unique(result)


def test_spring_forward_row_for_the_missing_hour_is_kept_with_zero_length() -> None:
    result = parse(pge_day("2025-03-09", HOURS))
    frame = result.intervals
    assert frame.height == 24
    assert rows(result, "interval_start", "duration_s", "raw_value")[:5] == [
        (utc("2025-03-09 08:00"), 3600, 1.0),  # 00:00 PST
        (utc("2025-03-09 09:00"), 3600, 2.0),  # 01:00 PST
        (utc("2025-03-09 10:00"), 0, 3.0),  # 02:00 does not exist: zero length at 03:00 PDT
        (utc("2025-03-09 10:00"), 3600, 4.0),  # 03:00 PDT
        (utc("2025-03-09 11:00"), 3600, 5.0),
    ]
    assert frame["raw_value"].sum() == sum(range(1, 25))  # nothing vanished
    assert frame["duration_s"].sum() == 82800
    assert frame.filter(pl.col("duration_s") == 0)["reading_type"].to_list() == [
        "csv:electricity:flow1:Wh:PT1H"
    ]
    assert_keys_unique(result)


# --------------------------------------------------------------------------- time zones

ONE_ROW = HEADER_UNITS + "\nElectric usage,2025-01-15,00:00,00:59,1,kWh,,\n"


def test_explicit_timezone_overrides_the_california_default() -> None:
    result = parse(fixture("pge_electric_usage_units.csv"), timezone="America/New_York")
    assert result.timezone == "America/New_York"
    assert result.intervals["interval_start"][0] == utc("2025-03-20 04:00")  # 00:00 EDT


@pytest.mark.parametrize(
    "preamble",
    [
        'Address,"1 ELM ST, SACRAMENTO, CA 95814"',
        "Name,Pacific Gas and Electric Company customer",
        "Service,PG&E Electric",
    ],
)
def test_pge_is_recognised_from_its_preamble(preamble: str) -> None:
    result = parse(f"Account Number,1\n{preamble}\n\n{ONE_ROW}", fallback_timezone="Europe/Berlin")
    assert result.timezone == "America/Los_Angeles"
    assert result.intervals["interval_start"][0] == utc("2025-01-15 08:00")


def test_other_utilities_use_the_fallback_zone() -> None:
    result = parse(f'Address,"1 ELM ST, CHICAGO IL 60601"\n\n{ONE_ROW}', fallback_timezone="America/Chicago")
    assert result.timezone == "America/Chicago"
    assert result.intervals["interval_start"][0] == utc("2025-01-15 06:00")


def test_no_zone_at_all_is_rejected_asking_for_timezone() -> None:
    with pytest.raises(Rejected) as info:
        parse_utility_csv(fixture("peco_electric.csv"))
    assert "--timezone" in info.value.reason
    assert info.value.format_name == "greenbutton_csv"


@pytest.mark.parametrize("zones", [{"timezone": "Mars/Olympus"}, {"fallback_timezone": "Not/AZone"}])
def test_unknown_zone_names_are_rejected(zones: dict[str, str]) -> None:
    with pytest.raises(Rejected, match="unknown time zone"):
        parse_utility_csv(fixture("peco_electric.csv"), **zones)


# --------------------------------------------------------------------------- rejections

GOOD_ROW = "Electric usage,2025-03-20,01:00,01:59,0.50,kWh,$0.10,"


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ("Electric usage,2025-03-20,01:00,01:59,abc,kWh,$0.10,", "line 8: USAGE value 'abc' is not a number"),
        (
            "Electric usage,2025-02-30,01:00,01:59,0.50,kWh,$0.10,",
            "line 8: DATE value '2025-02-30' is not a date",
        ),
        (
            "Electric usage,20/03/2025,01:00,01:59,0.50,kWh,$0.10,",
            "line 8: DATE value '20/03/2025' is not a date",
        ),
        (
            "Electric usage,2025-03-20,1am,01:59,0.50,kWh,$0.10,",
            "line 8: START TIME value '1am' is not a time",
        ),
        (
            "Electric usage,2025-03-20,01:00,01:60,0.50,kWh,$0.10,",
            "line 8: END TIME value '01:60' is not a time",
        ),
        (GOOD_ROW + ",extra", "line 8: expected 8 fields as in the header, found 9"),
        (
            "Electric usage,2025-03-20,01:00,01:59,0.50,kWh",
            "line 8: expected 8 fields as in the header, found 6",
        ),
        ("Electric usage,2025-03-20,01:00,01:59,0.50,kWhr,$0.10,", "line 8: USAGE unit 'kWhr' is not one"),
        (
            "Electric usage,2025-03-20,01:00,01:59,0.50,kWh,$0.1.0,",
            "line 8: COST value '$0.1.0' is not an amount",
        ),
    ],
)
def test_bad_rows_are_rejected_naming_the_line(bad_row: str, reason: str) -> None:
    text = lines(
        *PGE_PREAMBLE, HEADER_UNITS, GOOD_ROW.replace("01:", "00:"), bad_row, GOOD_ROW.replace("01:", "02:")
    )
    with pytest.raises(Rejected) as info:
        parse_utility_csv(text.encode())
    assert info.value.reason.startswith(reason), info.value.reason
    assert info.value.format_name == "greenbutton_csv"


def test_a_header_without_rows_gives_no_intervals() -> None:
    result = parse(lines(*PGE_PREAMBLE, HEADER_UNITS))
    assert result.intervals.is_empty()
    assert result.timezone == "America/Los_Angeles"


def test_a_spreadsheet_resaved_file_in_cp1252_is_read() -> None:
    text = lines("Name,JOS\u00c9 N\u00da\u00d1EZ", *PGE_PREAMBLE[1:], HEADER_UNITS, GOOD_ROW)
    result = parse(text.encode("cp1252"))
    assert result.intervals["value"].to_list() == [500.0]


def test_a_dropped_trailing_empty_notes_cell_is_tolerated() -> None:
    result = parse(lines(*PGE_PREAMBLE, HEADER_UNITS, GOOD_ROW.removesuffix(",")))
    assert rows(result, "value", "cost", "quality") == [(500.0, 0.10, None)]


@pytest.mark.parametrize(
    ("second", "third", "reason"),
    [
        (
            "Electric usage,2025-03-20,01:00,01:59,zero,kWh,,",
            "Electric usage,yesterday,02:00,02:59,0.50,kWh,,",
            "line 8: USAGE value 'zero' is not a number",
        ),
        (
            "Electric usage,yesterday,01:00,01:59,0.50,kWh,,",
            "Electric usage,2025-03-20,02:00,02:59,zero,kWh,,",
            "line 8: DATE value 'yesterday' is not a date",
        ),
        (
            "Electric usage,2025-03-20,01:00,01:59,zero,kWh,,",
            "Electric usage,2025-03-20,02:00,02:59,0.50,kWh,,,,",
            "line 8: USAGE value 'zero' is not a number",
        ),
        (
            "Electric usage,2025-03-20,01:00,01:59,0.50,kWh,,,,",
            "Electric usage,2025-03-20,02:00,02:59,zero,kWh,,",
            "line 8: expected 8 fields as in the header, found 10",
        ),
    ],
)
def test_the_earliest_bad_line_is_named(second: str, third: str, reason: str) -> None:
    text = lines(
        *PGE_PREAMBLE, HEADER_UNITS, "Electric usage,2025-03-20,00:00,00:59,0.50,kWh,,", second, third
    )
    with pytest.raises(Rejected) as info:
        parse_utility_csv(text.encode())
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ('"9","13/45/2025","12:00 AM","15","0.1"', "line 5: Date value '13/45/2025' is not a date"),
        ('"9","1/1/2025","13:00 PM","15","0.1"', "line 5: Start Time value '13:00 PM' is not a time"),
        ('"9","1/1/2025","12:00 AM","fifteen","0.1"', "line 5: Duration value 'fifteen' is not a length"),
        ('"9","1/1/2025","12:00 AM","15"', "line 5: expected 5 fields as in the header, found 4"),
    ],
)
def test_bad_sdge_rows_are_rejected_naming_the_line(bad_row: str, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_utility_csv(lines(*SDGE_HEAD, bad_row).encode())
    assert info.value.reason == reason


def test_bad_sce_rows_are_rejected_naming_the_line() -> None:
    sample = SCE_SAMPLE.read_bytes().decode("utf-8").split("\r\n")
    line = 16
    assert sample[line - 1].endswith('","0.380",""')
    bad_value = list(sample)
    bad_value[line - 1] = bad_value[line - 1].replace('"0.380"', '"0.3.80"')
    with pytest.raises(Rejected) as info:
        parse_utility_csv("\r\n".join(bad_value).encode())
    assert info.value.reason == f"line {line}: usage value '0.3.80' is not a number"

    short = list(sample)
    short[line - 1] = short[line - 1].removesuffix(',""')
    with pytest.raises(Rejected) as info:
        parse_utility_csv("\r\n".join(short).encode())
    assert info.value.reason == f"line {line}: expected 3 fields as in the table header, found 2"
