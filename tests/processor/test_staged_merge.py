"""Large Green Button feeds: merged from their scratch table in slices, on a small DuckDB budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor import ingest as ingest_module
from processor import store as store_module
from processor.ingest import Ingester
from processor.store import FRUGAL_MEMORY, Store

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "samples" / "greenbutton"


def _settings(store: Store) -> tuple[str, str]:
    row = store.con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def _intervals(store: Store) -> list[tuple[object, ...]]:
    return store.con.execute(
        "SELECT * EXCLUDE (file_id, delivered_at, version_at) FROM greenbutton_intervals ORDER BY ALL"
    ).fetchall()


def test_a_sliced_merge_stores_what_one_merge_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sample, PG&E's repeated blocks included, through slices of 97 rows and through one."""
    monkeypatch.setattr(ingest_module, "XML_STAGING_BYTES", 0)
    tables = {}
    for slice_rows in (97, 1 << 40):
        monkeypatch.setattr(store_module, "MERGE_SLICE_ROWS", slice_rows)
        with Store(tmp_path / f"{slice_rows}.duckdb") as store:
            ingester = Ingester(store)
            for sample in sorted(SAMPLES.glob("*.xml")):
                assert ingester.ingest(sample).status == "ingested"
            tables[slice_rows] = _intervals(store)
    assert tables[97] == tables[1 << 40] and len(tables[97]) > 5000


def test_a_sliced_merge_runs_one_statement_per_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_module, "XML_STAGING_BYTES", 0)
    monkeypatch.setattr(store_module, "MERGE_SLICE_ROWS", 500)
    merges: list[int] = []
    original = Store._merge

    def counting(self: Store, *args: object, **kwargs: object) -> None:
        merges.append(1)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_merge", counting)
    with Store(tmp_path / "m.duckdb") as store:
        outcome = Ingester(store).ingest(SAMPLES / "PGEIntervalBlock.xml")
        assert (outcome.status, outcome.rows) == ("ingested", 2556)
        assert store.con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone() == (2280,)
    # 2556 staged rows in slices of 500: six interval MERGEs, then the feed's other objects
    assert len(merges) >= 6


def test_a_staged_feed_runs_on_the_small_budget_and_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "XML_STAGING_BYTES", 0)
    during: list[tuple[str, str]] = []
    original_append, original_merge = Store.append, Store._merge

    def append(self: Store, *args: object) -> None:
        during.append(_settings(self))
        original_append(self, *args)  # type: ignore[arg-type]

    def merge(self: Store, *args: object, **kwargs: object) -> None:
        during.append(_settings(self))
        original_merge(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "append", append)
    monkeypatch.setattr(Store, "_merge", merge)
    with Store(tmp_path / "m.duckdb") as store:
        before = _settings(store)
        assert Ingester(store).ingest(SAMPLES / "PGEIntervalBlock.xml").status == "ingested"
        assert _settings(store) == before
        broken = tmp_path / "broken.xml"
        broken.write_bytes((SAMPLES / "PGEIntervalBlock.xml").read_bytes()[:-200])
        assert Ingester(store).ingest(broken).status == "rejected"
        assert _settings(store) == before
    small = store_module.duckdb.connect()
    small.execute(f"SET memory_limit = '{FRUGAL_MEMORY}'")
    budget = small.execute("SELECT current_setting('memory_limit')").fetchone()
    assert during and budget is not None and set(during) == {(str(budget[0]), "1")}
    assert before != (str(budget[0]), "1")


def test_a_small_feed_keeps_the_full_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    original = Store._merge

    def merge(self: Store, *args: object, **kwargs: object) -> None:
        seen.append(_settings(self))
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_merge", merge)
    with Store(tmp_path / "m.duckdb") as store:
        before = _settings(store)
        assert Ingester(store).ingest(SAMPLES / "PGEIntervalBlock.xml").status == "ingested"
    assert seen and set(seen) == {before}


def _daily_feed(path: Path, readings: int) -> None:
    """An ESPI feed of hourly readings in daily blocks, as bench/bench_greenbutton.py writes it."""
    espi, start = "http://naesb.org/espi", 1_577_836_800
    with path.open("w") as out:
        out.write('<feed xmlns="http://www.w3.org/2005/Atom">'
                  '<entry><link rel="self" href="/UsagePoint/1"/><link rel="related" href="/UsagePoint/1/MeterReading"/>'
                  f'<content><UsagePoint xmlns="{espi}"><ServiceCategory><kind>0</kind></ServiceCategory>'
                  "</UsagePoint></content></entry>"
                  '<entry><link rel="self" href="/UsagePoint/1/MeterReading/1"/>'
                  '<link rel="up" href="/UsagePoint/1/MeterReading"/><link rel="related" href="/ReadingType/1"/>'
                  f'<content><MeterReading xmlns="{espi}"/></content></entry>'
                  f'<entry><link rel="self" href="/ReadingType/1"/><content><ReadingType xmlns="{espi}">'
                  "<intervalLength>3600</intervalLength><powerOfTenMultiplier>0</powerOfTenMultiplier>"
                  "<uom>72</uom></ReadingType></content></entry>\n")  # fmt: skip
        for day in range(0, readings, 24):
            out.write(f'<entry><link rel="self" href="/UsagePoint/1/MeterReading/1/IntervalBlock/{day}"/>'
                      '<link rel="up" href="/UsagePoint/1/MeterReading/1/IntervalBlock"/>'
                      f'<content><IntervalBlock xmlns="{espi}"><interval><duration>86400</duration>'
                      f"<start>{start + day * 3600}</start></interval>")  # fmt: skip
            out.writelines(
                f"<IntervalReading><timePeriod><duration>3600</duration><start>{start + i * 3600}</start>"
                f"</timePeriod><value>{i % 5000}</value></IntervalReading>"
                for i in range(day, day + 24)
            )
            out.write("</IntervalBlock></content></entry>\n")
        out.write("</feed>\n")


def test_a_million_readings_merge_within_half_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each slice's MERGE is told the slice's time range: without it DuckDB needed more than
    32 MB to merge a million readings (and more than 64 MB for three million)."""
    feed = tmp_path / "million.xml"
    _daily_feed(feed, 1_000_008)
    monkeypatch.setattr(store_module, "FRUGAL_MEMORY", "32MB")
    with Store(tmp_path / "m.duckdb") as store:
        outcome = Ingester(store).ingest(feed)
        assert (outcome.status, outcome.rows) == ("ingested", 1_000_008), outcome.detail
        assert store.con.execute(
            "SELECT count(*), min(raw_value), max(raw_value) FROM greenbutton_intervals"
        ).fetchone() == (1_000_008, 0, 4999)
