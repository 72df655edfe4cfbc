"""Closing without a checkpoint (what `serve` does every second): nothing is lost, readers see it all."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor.ingest import Ingester
from processor.store import Store, open_store
from tests.conftest import MEASUREMENTS_HEADER, write_delivery


@pytest.mark.parametrize("checkpoint", [True, False])
def test_rows_survive_a_close_with_or_without_a_checkpoint(tmp_path: Path, checkpoint: bool) -> None:
    database = tmp_path / "m.duckdb"
    delivery = write_delivery(
        tmp_path / "a.csv", [MEASUREMENTS_HEADER, "1,d,2024-01-01T00:00:00Z,15,1,s,1,230,5,1,2"]
    )
    with open_store(database, checkpoint_on_close=checkpoint) as store:
        assert Ingester(store).ingest(delivery).status == "ingested"
    wal = database.with_name(database.name + ".wal")
    assert wal.exists() is not checkpoint  # the log is left for the next open only when asked
    with open_store(database, read_only=True) as reader:  # a reader replays it
        assert reader.con.execute("SELECT power_w FROM panoramic_measurements").fetchall() == [(5.0,)]
        assert reader.con.execute("SELECT status FROM files").fetchall() == [("ingested",)]
    with Store(database) as writer:  # and so does the next writer, which checkpoints on close
        assert writer.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (1,)
    assert not wal.exists()
