"""How the Store hands delivered rows to DuckDB."""

from __future__ import annotations

import gc
import weakref
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from processor import store as store_module
from processor.store import UPDATED_VERSION, Store


def test_a_transaction_keeps_no_merged_rows_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows already merged are freed before COMMIT, or a file merged block by block held them all.

    (``con.register`` did that: inside a transaction DuckDB keeps a dropped view, and the
    Arrow table behind it, until COMMIT.)
    """
    handed: list[weakref.ref[pa.Table]] = []
    batches = store_module._batches

    def watched(rows: pl.DataFrame) -> pa.Table:
        table = batches(rows)
        handed.append(weakref.ref(table))
        return table

    monkeypatch.setattr(store_module, "_batches", watched)
    with Store(tmp_path / "m.duckdb") as store:
        with store.transaction():
            for block in range(3):
                rows = pl.DataFrame({
                    "usage_point": [f"/UsagePoint/{block}"],
                    "version_at": [datetime(2024, 1, 1, tzinfo=UTC)],
                    "source_path": ["feed.xml"],
                    "source_line": [block + 1],
                })  # fmt: skip
                store.merge("greenbutton_usage_points", rows, ("usage_point",), UPDATED_VERSION)
            gc.collect()
            alive = [ref() is not None for ref in handed]
        stored = store.con.execute("SELECT count(*) FROM greenbutton_usage_points").fetchone()
    assert len(handed) == 3
    assert alive == [False, False, False]
    assert stored == (3,)
