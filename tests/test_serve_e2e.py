"""End to end: `meterdrop serve` as a real process, real OpenSSH sftp and curl clients,
and `meterdrop query` reading the database while the server runs."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MEASUREMENTS_HEADER, SHARED, free_port_range

PASSWORD = "a long passphrase for tests"


def meterdrop(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], input=stdin, capture_output=True, text=True,
                          check=False, timeout=120)  # fmt: skip


class Server:
    """A running `meterdrop serve`, with the ports it reported."""

    def __init__(self, data_dir: Path) -> None:
        self.passive = free_port_range(3)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meterdrop", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--sftp-port", "0", "--ftps-port", "0", "--passive-ports", f"{self.passive.start}-{self.passive.stop - 1}",
             "--certs-dir", str(data_dir / "certs")],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        ready = threading.Event()
        ports: dict[str, int] = {}

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"SFTP on [\d.]+:(\d+), FTPS on [\d.]+:(\d+)", line)
                if match:
                    ports.update(sftp=int(match.group(1)), ftps=int(match.group(2)))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(60) and ports, "".join(self.log)
        self.sftp_port, self.ftps_port = ports["sftp"], ports["ftps"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Path, Path]]:
    data = tmp_path / "data"
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    added = meterdrop("users", "add", "acme", "--password-stdin", "--authorized-key", f"{key}.pub",
                      "--data-dir", str(data), stdin=PASSWORD + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    server = Server(data)
    try:
        yield server, data, key
    finally:
        if server.process.poll() is None:
            server.stop()


def sftp_batch(server: Server, key: Path, batch: Path) -> subprocess.CompletedProcess[str]:
    """OpenSSH ``sftp -b`` as user acme with ``key``."""
    return subprocess.run(
        ["sftp", "-b", str(batch), "-i", str(key), "-P", str(server.sftp_port), "-oBatchMode=yes",
         "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null", "acme@127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def wait_for_ledger(data: Path, count: int, deadline: float = 60) -> list[dict[str, object]]:
    """Poll the ledger through `meterdrop query` (while the server runs) until ``count`` files are in."""
    end = time.monotonic() + deadline
    while True:
        result = meterdrop("query", "--data-dir", str(data), "--format", "json",
                           "SELECT path, format, status, rows FROM files ORDER BY path")  # fmt: skip
        rows = json.loads(result.stdout) if result.returncode == 0 else []
        if len(rows) >= count or time.monotonic() > end:
            return rows
        time.sleep(0.2)


def test_deliveries_over_sftp_and_ftps_are_queryable_while_serving(served, tmp_path: Path) -> None:
    server, data, key = served
    export = tmp_path / "export.csv"
    export.write_text(
        MEASUREMENTS_HEADER + "\n1001,Chiller,2024-03-01T09:00:00Z,15,77,HQ,12.5,230,2875,0.95,718.75\n"
    )
    batch = tmp_path / "batch"
    batch.write_text("mkdir Measurements\nput " + str(export) + " Measurements/export.csv\n")
    sftp = sftp_batch(server, key, batch)
    assert sftp.returncode == 0, sftp.stderr
    xml = (
        SHARED
        / "samples"
        / "greenbutton"
        / "ngma_natural_gas_billing_billing_data_Service_1_1_2021-05-26_to_2024-04-25.xml"
    )
    curl = subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--insecure", "--ftp-pasv", "--ftp-create-dirs",
         "--user", f"acme:{PASSWORD}", "-T", str(xml), f"ftp://127.0.0.1:{server.ftps_port}/greenbutton/gas.xml"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert curl.returncode == 0, curl.stderr

    ledger = wait_for_ledger(data, 2)
    drop = data / "drop" / "acme"
    assert ledger == [
        {"path": str(drop / "Measurements" / "export.csv"), "format": "panoramic_measurements",
         "status": "ingested", "rows": 1},
        {"path": str(drop / "greenbutton" / "gas.xml"), "format": "greenbutton_xml", "status": "ingested",
         "rows": 35},
    ], "".join(server.log)  # fmt: skip
    energy = meterdrop("query", "--data-dir", str(data), "--format", "csv",
                       "SELECT energy_wh FROM panoramic_measurements")  # fmt: skip
    assert energy.stdout.splitlines() == ["energy_wh", "718.75"]
    cost = meterdrop("query", "--data-dir", str(data), "--format", "csv",
                     "SELECT cost FROM greenbutton_intervals ORDER BY interval_start LIMIT 1")  # fmt: skip
    assert cost.stdout.splitlines() == ["cost", "51.0"]
    assert server.stop() == 0


def test_the_same_name_delivered_three_times_in_a_row_gives_three_deliveries(served, tmp_path: Path) -> None:
    """An export job writing one name again and again: no delivery may be lost to the next one."""
    server, data, key = served
    batch = tmp_path / "batch"
    lines = []
    for hour in (10, 11, 12):
        export = tmp_path / f"h{hour}.csv"
        export.write_text(
            MEASUREMENTS_HEADER + f"\n7,Fan,2024-03-01T{hour}:00:00Z,60,1,HQ,1,230,230,1,{hour}\n"
        )
        lines.append(f"put {export} latest.csv")
    batch.write_text("\n".join(lines) + "\n")
    sftp = sftp_batch(server, key, batch)
    assert sftp.returncode == 0, sftp.stderr
    ledger = wait_for_ledger(data, 3)
    latest = str(data / "drop" / "acme" / "latest.csv")
    assert [(r["path"], r["status"]) for r in ledger] == [(latest, "ingested")] * 3, "".join(server.log)
    energy = meterdrop("query", "--data-dir", str(data), "--format", "csv",
                       "SELECT energy_wh FROM panoramic_measurements ORDER BY measurement_time")  # fmt: skip
    assert energy.stdout.splitlines() == ["energy_wh", "10.0", "11.0", "12.0"]
    assert not any((data / "drop" / ".deliveries").iterdir())
    assert server.stop() == 0


def test_files_dropped_while_down_are_taken_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    meterdrop("users", "add", "acme", "--password-stdin", "--data-dir", str(data), stdin=PASSWORD + "\n")
    dropped = data / "drop" / "acme" / "by-hand.csv"
    dropped.write_text(MEASUREMENTS_HEADER + "\n7,Fan,2024-03-01T09:00:00Z,60,1,HQ,1,230,230,1,230\n")
    server = Server(data)
    try:
        ledger = wait_for_ledger(data, 1)
        assert [(r["path"], r["status"]) for r in ledger] == [(str(dropped), "ingested")]
    finally:
        assert server.stop() == 0


def _backlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_open: Callable[[Path], None]):  # type: ignore[no-untyped-def]
    """serve's ingest loop with slices of no time at all over three files; ``on_open`` hears each open."""
    import meterdrop.serve as serving
    from processor.store import open_store

    def opening(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
        on_open(path)
        return open_store(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serving, "open_store", opening)
    monkeypatch.setattr(serving, "HOLD_SECONDS", 0.0)
    monkeypatch.setattr(serving, "YIELD_SECONDS", 0.0)
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}.csv"
        path.write_text(MEASUREMENTS_HEADER + f"\n{i},d,2024-03-01T09:00:00Z,60,1,HQ,1,230,230,1,230\n")
        files.append(path)
    config = serving.ServeConfig(
        data_dir=tmp_path, database=tmp_path / "db.duckdb", certs_dir=tmp_path / "certs", host="127.0.0.1",
        sftp_port=0, ftps_port=0, passive_ports=range(1, 2), public_host=None, max_upload_bytes=None, timezone=None,
    )  # fmt: skip
    return serving, config, files


def test_a_backlog_lets_go_of_the_database_between_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers must get in while the server works through many files (it once held it 81 s)."""
    from processor.store import open_store

    opened: list[Path] = []
    serving, config, files = _backlog(tmp_path, monkeypatch, opened.append)
    serving._ingest_batch(config, files)
    assert len(opened) == 3  # one slice per file when a slice may last no time at all
    with open_store(tmp_path / "db.duckdb", read_only=True) as store:
        assert store.con.execute("SELECT count(*) FROM files WHERE status = 'ingested'").fetchone() == (3,)


def test_sigterm_during_a_backlog_leaves_the_rest_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst's backlog can take a minute; SIGTERM must not wait for all of it (exit within 10 s)."""
    from processor.store import open_store

    stopping = threading.Event()
    serving, config, files = _backlog(tmp_path, monkeypatch, lambda path: stopping.set())  # SIGTERM mid-slice
    with caplog.at_level("INFO", logger="meterdrop"):
        left = serving._ingest_batch(config, files, stopping)
    assert left == files[1:]
    assert "stopping: 2 file(s) left for the next start" in caplog.text
    with open_store(tmp_path / "db.duckdb", read_only=True) as store:
        assert store.con.execute("SELECT path FROM files").fetchall() == [(str(files[0]),)]


@pytest.mark.parametrize("busy", ["--sftp-port", "--ftps-port"])
def test_a_port_in_use_ends_the_start_with_its_reason(tmp_path: Path, busy: str) -> None:
    """Exit 1 with the reason; once a thread left running made the exit abort (SIGABRT, 134)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {"--sftp-port": "0", "--ftps-port": "0", busy: str(taken.getsockname()[1])}
        passive = free_port_range(3)
        result = subprocess.run(
            [sys.executable, "-m", "meterdrop", "serve", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
             *(item for pair in ports.items() for item in pair),
             "--passive-ports", f"{passive.start}-{passive.stop - 1}", "--certs-dir", str(tmp_path / "certs")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_server_on_the_same_data_dir_is_refused_and_touches_nothing(served) -> None:
    """It once swept the running server's uploads in progress at its start, even when it then failed."""
    server, data, _ = served
    in_progress = data / "drop" / "acme" / ".export.csv.part-0a1b2c3d"  # as a running upload's partial
    in_progress.parent.mkdir(parents=True, exist_ok=True)
    in_progress.write_text("half an upload")
    passive = free_port_range(2)
    second = meterdrop("serve", "--data-dir", str(data), "--host", "127.0.0.1", "--sftp-port", "0", "--ftps-port",
                       "0", "--passive-ports", f"{passive.start}-{passive.stop - 1}",
                       "--certs-dir", str(data / "certs"))  # fmt: skip
    assert second.returncode == 1
    assert f"cannot start: {data} is already served by process {server.process.pid}" in second.stderr
    assert in_progress.read_text() == "half an upload"
    assert server.stop() == 0


def test_sigterm_while_another_process_holds_the_database_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve waits for a DuckDB CLI or notebook holding the file, but not once it is told to stop."""
    waiting, stopping = threading.Event(), threading.Event()
    serving, config, files = _backlog(tmp_path, monkeypatch, lambda path: None)
    import processor.store

    def open_noting_the_wait(path: Path, **kwargs):  # type: ignore[no-untyped-def]
        told = kwargs["on_wait"]
        kwargs["on_wait"] = lambda why: (waiting.set(), told(why))
        return processor.store.open_store(path, **kwargs)

    monkeypatch.setattr(serving, "open_store", open_noting_the_wait)
    processor.store.Store(config.database).close()  # the database exists, as it would
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "sys.stdin.read()", str(config.database)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        left: list[list[Path]] = []
        worker = threading.Thread(target=lambda: left.append(serving._ingest_batch(config, files, stopping)))
        worker.start()
        assert waiting.wait(60), "serve never waited for the database"
        stopping.set()  # SIGTERM
        worker.join(10)
        assert not worker.is_alive(), "serve kept waiting for the database after SIGTERM"
        assert left == [files]
    finally:
        holder.communicate("")
