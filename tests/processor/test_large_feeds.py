"""Large Green Button feeds: appended to their table as parsed, then settled in slices, on a small DuckDB budget."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from processor import ingest as ingest_module
from processor import store as store_module
from processor.greenbutton import espi as espi_module
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
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    tables = {}
    for slice_rows in (97, 1 << 40):
        monkeypatch.setattr(store_module, "MERGE_SLICE_ROWS", slice_rows)
        with Store(tmp_path / f"{slice_rows}.duckdb") as store:
            ingester = Ingester(store)
            for sample in sorted(SAMPLES.glob("*.xml")):
                assert ingester.ingest(sample).status == "ingested"
            tables[slice_rows] = _intervals(store)
    assert tables[97] == tables[1 << 40] and len(tables[97]) > 5000


def test_a_re_delivery_is_settled_one_slice_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    monkeypatch.setattr(store_module, "MERGE_SLICE_ROWS", 500)
    met: list[object] = []
    monkeypatch.setattr(Store, "_others_within", _spy(Store._others_within, met, "stored?"))
    first, again = tmp_path / "first.xml", tmp_path / "again.xml"
    _daily_feed(first, 2400, updated="2024-01-02T00:00:00Z")
    _daily_feed(again, 2400, updated="2024-01-03T00:00:00Z", offset=7)
    with Store(tmp_path / "m.duckdb") as store:
        assert Ingester(store).ingest(first).status == "ingested"
        assert met == []  # nothing stored in the feed's range: no slice needs to look
        assert Ingester(store).ingest(again).status == "ingested"
        # 2400 rows in slices of 500: five slices, each meeting stored readings
        assert met == [("stored?", True)] * 5
        assert store.con.execute(
            "SELECT count(*), count(DISTINCT file_id), min(raw_value), max(raw_value) FROM greenbutton_intervals"
        ).fetchone() == (2400, 1, 7, 2406)


def test_a_large_feed_runs_on_the_small_budget_and_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    during: list[tuple[str, str]] = []
    original_append, original_merge = store_module._append, Store.merge

    def append(con: store_module.duckdb.DuckDBPyConnection, *args: object) -> None:
        row = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
        assert row is not None
        during.append((str(row[0]), str(row[1])))
        original_append(con, *args)  # type: ignore[arg-type]

    def merge(self: Store, *args: object, **kwargs: object) -> None:
        during.append(_settings(self))
        original_merge(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_append", append)
    monkeypatch.setattr(Store, "merge", merge)
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


def test_the_full_budget_is_really_back_after_a_large_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB 1.5's `RESET memory_limit` said the default was back while the buffer pool kept
    the small limit: a list of 20M numbers (160 MB, which cannot spill) then failed."""
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    big = "SELECT length(list(range)) FROM range(20000000)"
    with Store(tmp_path / "m.duckdb") as store:
        assert store.con.execute(big).fetchone() == (20_000_000,)
        with store.frugal(), pytest.raises(store_module.duckdb.OutOfMemoryException):
            store.con.execute(big)
        assert store.con.execute(big).fetchone() == (20_000_000,)
        assert Ingester(store).ingest(SAMPLES / "PGEIntervalBlock.xml").status == "ingested"
        assert store.con.execute(big).fetchone() == (20_000_000,)


def test_a_small_feed_keeps_the_full_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    original = Store.merge

    def merge(self: Store, *args: object, **kwargs: object) -> None:
        seen.append(_settings(self))
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "merge", merge)
    with Store(tmp_path / "m.duckdb") as store:
        before = _settings(store)
        assert Ingester(store).ingest(SAMPLES / "PGEIntervalBlock.xml").status == "ingested"
    assert seen and set(seen) == {before}


def _daily_feed(
    path: Path, readings: int, *, updated: str | None = None, offset: int = 0, first: int = 0
) -> None:
    """An ESPI feed of hourly readings in daily blocks, as bench/bench_greenbutton.py writes it.

    Reading ``i`` (from ``first``) starts ``i`` hours into 2020 and holds ``i % 5000 + offset``;
    ``updated`` is every block's Atom ``updated`` (none: the file's delivery time counts).
    """
    stamp = f"<updated>{updated}</updated>" if updated else ""
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
        for day in range(first, first + readings, 24):
            out.write(f'<entry><link rel="self" href="/UsagePoint/1/MeterReading/1/IntervalBlock/{day}"/>'
                      f'<link rel="up" href="/UsagePoint/1/MeterReading/1/IntervalBlock"/>{stamp}'
                      f'<content><IntervalBlock xmlns="{espi}"><interval><duration>86400</duration>'
                      f"<start>{start + day * 3600}</start></interval>")  # fmt: skip
            out.writelines(
                f"<IntervalReading><timePeriod><duration>3600</duration><start>{start + i * 3600}</start>"
                f"</timePeriod><value>{i % 5000 + offset}</value></IntervalReading>"
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


def _deliveries(folder: Path) -> list[Path]:
    """Overlapping deliveries in an order that tests the rule: a newer one, an older one that
    must change nothing, one that overlaps half, and PG&E's sample with its repeated blocks."""
    made = []
    for name, readings, first, updated, offset in (
        ("base.xml", 2400, 0, "2024-01-02T00:00:00Z", 0),
        ("older.xml", 3600, 0, "2024-01-01T00:00:00Z", 100),
        ("half.xml", 2400, 1200, "2024-01-03T00:00:00Z", 7),
        ("undated.xml", 480, 3480, None, 11),
    ):
        _daily_feed(folder / name, readings, first=first, updated=updated, offset=offset)
        made.append(folder / name)
    return [*made, SAMPLES / "PGEIntervalBlock.xml"]


@pytest.fixture(params=["beside the parser", "in line"])
def appends(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Large feeds up to PARALLEL_APPEND_BYTES are appended on a thread, larger ones in line."""
    monkeypatch.setattr(
        ingest_module, "PARALLEL_APPEND_BYTES", 1 << 40 if request.param == "beside the parser" else 0
    )
    return str(request.param)


def test_a_large_feed_is_stored_as_an_in_memory_merge_stores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, appends: str
) -> None:
    """A large feed's rows are appended to the table, then settled slice by slice: a file's
    repeated keys keep their newest row, and where stored readings share a slice the older of
    each pair goes. That must give what one MERGE of the parsed rows gives, and in a group's
    transaction (reachable only with changed size settings) too."""
    deliveries = _deliveries(tmp_path)
    monkeypatch.setattr(store_module, "MERGE_SLICE_ROWS", 700)
    ways: list[object] = []
    monkeypatch.setattr(Store, "_others_within", _spy(Store._others_within, ways, "stored?"))
    monkeypatch.setattr(Store, "_repeats_within", _spy(Store._repeats_within, ways, "repeats?"))
    tables = {}
    for way in ("merged", "settled", "settled in a group"):
        monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 1 << 40 if way == "merged" else 0)
        with Store(tmp_path / f"{way}.duckdb") as store:
            ingester = Ingester(store)
            for delivery in deliveries:
                if way == "settled in a group":
                    assert [o.status for o in ingester.ingest_group([delivery])] == ["ingested"]
                else:
                    assert ingester.ingest(delivery).status == "ingested"
            tables[way] = _intervals(store)
    assert tables["settled"] == tables["merged"] == tables["settled in a group"]
    assert len(tables["merged"]) > 3600 + 2000
    # Slices with and without stored readings, with and without repeated keys (PG&E's
    # sample holds 2,280 distinct of 2,556).
    assert {("stored?", True), ("stored?", False), ("repeats?", True), ("repeats?", False)} <= set(ways)


def _spy(method: object, log: list[object], name: str) -> object:
    """``method``, noting each call's name and result (or the exception it raised) in ``log``."""

    def spying(*args: object, **kwargs: object) -> object:
        try:
            result = method(*args, **kwargs)  # type: ignore[operator]
        except Exception as error:
            log.append((name, type(error).__name__))
            raise
        log.append((name, result))
        return result

    return spying


def test_a_failed_append_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, appends: str
) -> None:
    """Whether the rows are appended beside the parser or in line, an append's error reaches
    the ingest, no thread is left, and nothing is stored."""
    feed = tmp_path / "feed.xml"
    _daily_feed(feed, 2400)
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    monkeypatch.setattr(espi_module, "BATCH_READINGS", 300)
    original, calls, threads = store_module._append, [], set()

    def failing(*args: object) -> None:
        calls.append(1)
        threads.add(threading.current_thread().name.startswith("append-"))
        if len(calls) == 2:
            raise store_module.duckdb.IOException("disk gone")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_append", failing)
    with Store(tmp_path / "m.duckdb") as store:
        with pytest.raises(store_module.duckdb.IOException, match="disk gone"):
            Ingester(store).ingest(feed)
        assert not [t for t in threading.enumerate() if t.name.startswith("append-")]
        assert store.con.execute("SELECT count(*) FROM files").fetchone() == (0,)
        assert store.con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone() == (0,)
        monkeypatch.setattr(store_module, "_append", original)
        outcome = Ingester(store).ingest(feed)
        assert (outcome.status, outcome.rows) == ("ingested", 2400)
    assert len(calls) == 2  # it stopped appending at the failure
    assert threads == {appends == "beside the parser"}


def test_re_delivering_a_million_stored_readings_fits_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MERGE keeps each replaced row's old values until COMMIT: re-delivering 3M stored
    readings ran out of 64 MB. Deleting and inserting per slice fits a million in 32 MB."""
    first, again = tmp_path / "first.xml", tmp_path / "again.xml"
    _daily_feed(first, 1_000_008, updated="2024-01-02T00:00:00Z")
    _daily_feed(again, 1_000_008, updated="2024-01-03T00:00:00Z", offset=3)
    monkeypatch.setattr(store_module, "FRUGAL_MEMORY", "32MB")
    attempts: list[object] = []
    monkeypatch.setattr(Ingester, "_store", _spy(Ingester._store, attempts, "store"))
    with Store(tmp_path / "m.duckdb") as store:
        for feed in (first, again):
            outcome = Ingester(store).ingest(feed)
            assert (outcome.status, outcome.rows) == ("ingested", 1_000_008), outcome.detail
        assert [name for name, _ in attempts] == ["store", "store"]  # each within the budget, first time
        assert store.con.execute(
            "SELECT count(*), count(DISTINCT file_id), min(raw_value), max(raw_value) FROM greenbutton_intervals"
        ).fetchone() == (1_000_008, 1, 3, 5002)


@pytest.mark.parametrize("starved", ["the small budget", "the raised settle"])
def test_a_feed_that_outgrows_the_budget_is_ingested_on_the_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, starved: str
) -> None:
    """Replacing stored readings needs memory for each until COMMIT (10M re-delivered did not
    fit 64 MB): what runs out of the small budget is rolled back and done again without it.

    Also when the settle's raised budget is what runs out: DuckDB then takes nothing but
    ROLLBACK, and setting the small budget back failed in the aborted transaction; its
    error hid the out-of-memory one the retry waits for, and the run stopped."""
    first, again = tmp_path / "first.xml", tmp_path / "again.xml"
    _daily_feed(first, 24_000, updated="2024-01-02T00:00:00Z")
    _daily_feed(again, 24_000, updated="2024-01-03T00:00:00Z", offset=3)
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    attempts: list[object] = []
    monkeypatch.setattr(Ingester, "_store", _spy(Ingester._store, attempts, "store"))
    settle_slices = Store._settle_slices

    def starving(store: Store, *args: object) -> None:  # the raised budget turns out too small
        if store._frugal:
            store.con.execute("SET memory_limit = '1MB'")
        settle_slices(store, *args)  # type: ignore[arg-type]

    with Store(tmp_path / "m.duckdb") as store:
        before = _settings(store)
        assert Ingester(store).ingest(first).status == "ingested"
        assert [name for name, _ in attempts] == ["store"]
        if starved == "the small budget":
            monkeypatch.setattr(store_module, "FRUGAL_MEMORY", "1MB")
        else:
            monkeypatch.setattr(Store, "_settle_slices", starving)
        heard: list[int] = []
        outcome = Ingester(store, on_rows=heard.append).ingest(again)
        assert min(heard) < 0 and sum(heard) == 24_000  # what the first attempt reported was taken back
        assert (outcome.status, outcome.rows) == ("ingested", 24_000), outcome.detail
        # the second feed twice: out of the small budget, then on the full one
        outcomes = [result if isinstance(result, str) else name for name, result in attempts]
        assert outcomes == ["store", "OutOfMemoryException", "store"]
        assert _settings(store) == before
        assert store.con.execute(
            "SELECT count(*), count(DISTINCT file_id), min(raw_value), max(raw_value) FROM greenbutton_intervals"
        ).fetchone() == (24_000, 1, 3, 5002)
        assert store.con.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone() == (2, 2)
    assert "ran out of DuckDB's budget for large feeds" in caplog.text


def test_a_large_feed_rejected_inside_a_group_leaves_none_of_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's files share one transaction, so a large feed's appended rows cannot be rolled
    back alone: when the feed turns out bad, they are deleted, and the group goes on. Large
    feeds start at 16 MB and groups end at 8 MB, so only a changed setting brings the two
    together: this one."""
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    monkeypatch.setattr(espi_module, "BATCH_READINGS", 300)
    good, cut, later = tmp_path / "good.xml", tmp_path / "cut.xml", tmp_path / "later.xml"
    _daily_feed(good, 480, updated="2024-01-02T00:00:00Z")
    _daily_feed(cut, 2400, first=480, updated="2024-01-02T00:00:00Z")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 3 // 4])  # well-formed for 1,700 readings
    _daily_feed(later, 480, first=2880, updated="2024-01-02T00:00:00Z")
    appended: list[int] = []
    original = store_module._append

    def counting(con: object, table: str, rows: object) -> None:
        appended.append(rows.height)  # type: ignore[attr-defined]
        original(con, table, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_append", counting)
    with Store(tmp_path / "m.duckdb") as store:
        outcomes = Ingester(store).ingest_group([good, cut, later])
        assert [(o.status, o.rows) for o in outcomes] == [
            ("ingested", 480),
            ("rejected", 0),
            ("ingested", 480),
        ]
        assert "not well-formed" in (outcomes[1].detail or "")
        assert sum(appended) > 480 + 480 + 1000  # the cut feed's first readings did reach the table
        cut_hours = "interval_start BETWEEN to_timestamp(1577836800 + 480 * 3600) AND to_timestamp(1577836800 + 2879 * 3600)"
        assert store.con.execute(
            f"SELECT count(*), count(*) FILTER ({cut_hours}), count(DISTINCT file_id) FROM greenbutton_intervals"
        ).fetchone() == (960, 0, 2)


def test_a_settle_that_may_replace_many_stored_rows_gets_a_larger_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB keeps a mark per deleted row until COMMIT: re-delivering 10M stored readings ran
    out of the small budget mid-DELETE (and once failed its retry). For each stored row in
    the feed's range, the settle gets more budget, first time."""
    first, again = tmp_path / "first.xml", tmp_path / "again.xml"
    _daily_feed(first, 2400, updated="2024-01-02T00:00:00Z")
    _daily_feed(again, 2400, updated="2024-01-03T00:00:00Z", offset=3)
    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)
    monkeypatch.setattr(store_module, "_REPLACE_BYTES", 10_000)  # 2,400 rows: 24 MB more
    budgets: list[object] = []
    settle_slices = Store._settle_slices

    def noting(store: Store, *args: object) -> None:
        budgets.append(_settings(store))
        settle_slices(store, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_settle_slices", noting)
    attempts: list[object] = []
    monkeypatch.setattr(Ingester, "_store", _spy(Ingester._store, attempts, "store"))
    with Store(tmp_path / "m.duckdb") as store, caplog.at_level("INFO", logger="meterdrop.store"):
        full = _settings(store)
        for feed in (first, again):
            assert Ingester(store).ingest(feed).status == "ingested"
        assert _settings(store) == full
        assert store.con.execute(
            "SELECT count(*), count(DISTINCT file_id), min(raw_value), max(raw_value) FROM greenbutton_intervals"
        ).fetchone() == (2400, 1, 3, 2402)
    # nothing stored at first: the small budget; 2,400 stored readings in range: 24 MB more
    raised = f"{int(FRUGAL_MEMORY.removesuffix('MB')) + 24}MB"
    assert budgets == [(_spelled(FRUGAL_MEMORY), "1"), (_spelled(raised), "1")]
    assert [name for name, _ in attempts] == ["store", "store"]  # no second attempt
    assert f"replacing up to 2,400 stored rows: DuckDB's budget raised to {raised[:-2]} MB" in caplog.text


def _spelled(memory: str) -> str:
    """How DuckDB reports a memory limit set as ``memory``."""
    con = store_module.duckdb.connect()
    con.execute(f"SET memory_limit = '{memory}'")
    row = con.execute("SELECT current_setting('memory_limit')").fetchone()
    assert row is not None
    return str(row[0])
