"""Faults a drop box meets in production, against the real `meterdrop serve` process.

* the database held by another process (a notebook, the DuckDB CLI): ingest waits, says so,
  and resumes with nothing lost;
* the disk filling up under the database (a small tmpfs; where mounting is not allowed, a
  file-size limit on the server process stands in for it): a clear error in the log,
  nothing half-written, and the file ingested once space returns, without a restart;
* clock trouble: deliveries whose file time is in the past or the future; the result is
  fixed by the file times alone, whatever the order of processing;
* a file whose ingest raises instead of being rejected (a damaged ZIP): the files handed
  over with it are still ingested; and the watcher's retry and start-up scan order alone.

Running out of space while unpacking a ZIP is the machine's trouble, not the file's: it is
retried, never recorded as a rejection.

kill -9 at random moments is in tests/test_faults_kill.py (and bench/chaos_kill.py).
Every wait here polls a condition with a deadline; nothing sleeps in place of a check.
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pytest

from processor.store import open_store
from processor.watcher import DropWatcher
from tests.conftest import MEASUREMENTS_HEADER, free_port_range

ROOT = Path(__file__).resolve().parents[1]


def meterdrop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], capture_output=True, text=True,
                          check=False, timeout=120, cwd=ROOT)  # fmt: skip


def poll(condition: Callable[[], bool], what: str, timeout: float = 60.0, every: float = 0.2) -> None:
    """Wait until ``condition`` holds, checking every ``every`` s; fail after ``timeout`` s.

    Not conftest's 10 ms ``eventually``: conditions here open the database, and opening it
    100 times a second would itself keep the server out.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _ignore_file_size_signal() -> None:
    """So a file-size limit (the no-mount stand-in for a full disk) fails writes with EFBIG, not kills."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class Served:
    """`meterdrop serve` on loopback, its log collected line by line as it is written."""

    def __init__(self, data: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        passive = free_port_range(2)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meterdrop", "serve", "--data-dir", str(data), "--host", "127.0.0.1",
             "--sftp-port", "0", "--ftps-port", "0", "--passive-ports", f"{passive.start}-{passive.stop - 1}",
             "--certs-dir", str(data / "certs"), *extra],
            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
            preexec_fn=_ignore_file_size_signal,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        poll(lambda: self.logged(r"SFTP on ") or self.process.poll() is not None, "the server to start")
        assert self.process.poll() is None, self.log

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def logged(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def serving() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(data: Path, *extra: str, env: dict[str, str] | None = None) -> Served:
        started.append(Served(data, *extra, env=env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def rows(device: str, energy: float, hours: Sequence[int] = (0, 1, 2)) -> list[str]:
    return [MEASUREMENTS_HEADER] + [
        f"{device},Dev {device},2024-03-01T{hour:02d}:00:00Z,60,1,HQ,1,230,230,1,{energy}" for hour in hours
    ]


def drop(data: Path, name: str, lines: Sequence[str], mtime: float | None = None) -> Path:
    """Deliver a file by hand: written beside the drop folder, given its time, then moved in whole."""
    outside = data / "outside" / name
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text("\n".join(lines) + "\n")
    if mtime is not None:
        os.utime(outside, (mtime, mtime))
    final = data / "drop" / "acme" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(outside, final)
    return final


def ledger(db: Path) -> dict[str, tuple[str, int | None, str | None]]:
    """name -> (status, rows, error), read the way `meterdrop query` does (waiting out the server)."""
    if not db.exists():
        return {}
    with open_store(db, read_only=True, wait=60) as store:
        found = store.con.execute("SELECT path, status, rows, error FROM files").fetchall()
    return {Path(path).name: (status, count, error) for path, status, count, error in found}


def ingested(db: Path, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        seen = ledger(db)
        return all(seen.get(name, ("",))[0] == "ingested" for name in names)

    return check


def checked_ok(db: Path) -> str:
    result = meterdrop("check", "--db", str(db))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")
    return result.stdout


# -- the database held by another process ---------------------------------------------------------
HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])  # read-write, as a notebook that forgot read_only=True would
print("held", flush=True)
sys.stdin.readline()
print(con.execute("SELECT count(*) FROM files").fetchone()[0], flush=True)
con.close()
"""


def test_database_held_by_another_process_ingest_waits_then_resumes(
    tmp_path: Path, serving: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    db = data / "meterdrop.duckdb"
    server = serving(data)
    drop(data, "first.csv", rows("1", 1.0))
    poll(ingested(db, "first.csv"), "first.csv to be ingested")

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "held\n"
        drop(data, "second.csv", rows("2", 2.0))
        drop(data, "third.csv", rows("3", 3.0))
        poll(lambda: bool(server.logged(r"WARNING meterdrop: database busy \(.*lock.*\); waiting")),
             "the server to log that it waits for the database")  # fmt: skip
        holder.stdin.write("release\n")
        holder.stdin.flush()
        # what the holder saw as it let go: the server had written nothing while it waited
        assert holder.stdout.readline() == "1\n"
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0

    poll(ingested(db, "first.csv", "second.csv", "third.csv"), "every file to be ingested after the release")
    assert ledger(db) == {name: ("ingested", 3, None) for name in ("first.csv", "second.csv", "third.csv")}
    assert checked_ok(db).startswith("ok: 3 file(s) (3 ingested), 9 row(s) in 1 table(s)")
    assert not server.logged(r"ERROR|Traceback"), server.log
    assert server.stop() == 0


# -- the disk filling up ------------------------------------------------------------------------
class SmallDisk:
    """A folder with little free space: a tmpfs when mounting works (root), else a file-size limit.

    ``fill(leave)`` takes all but ``leave`` bytes away, ``free()`` gives them back, as an
    operator deleting old files would.  The stand-in (RLIMIT_FSIZE on the server process,
    raised again with prlimit) fails writes with EFBIG instead of ENOSPC; it exists because
    containers without CAP_SYS_ADMIN cannot mount.
    """

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        path.mkdir(parents=True)
        # METERDROP_TEST_NO_MOUNT=1 tries the stand-in where mounting would work.
        mounted = os.environ.get("METERDROP_TEST_NO_MOUNT") != "1" and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
            capture_output=True, check=False,
        ).returncode == 0  # fmt: skip
        self.mounted = mounted
        self.ballast = path / "ballast"
        self.server: psutil.Process | None = None

    @property
    def error(self) -> str:
        """The OS error a write gets when the space is gone."""
        return "No space left on device" if self.mounted else "File too large"

    def fill(self, leave: int, server: Served) -> None:
        if self.mounted:
            stats = os.statvfs(self.path)
            with self.ballast.open("wb") as ballast:
                ballast.write(b"\0" * max(stats.f_bavail * stats.f_frsize - leave, 0))
        else:
            largest = max((p.stat().st_size for p in self.path.rglob("*") if p.is_file()), default=0)
            self.server = psutil.Process(server.process.pid)
            self.server.rlimit(resource.RLIMIT_FSIZE, (largest + leave, resource.RLIM_INFINITY))

    def free(self) -> None:
        if self.mounted:
            self.ballast.unlink()
        elif self.server is not None:
            self.server.rlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], SmallDisk]]:
    made: list[SmallDisk] = []

    def make(name: str) -> SmallDisk:
        made.append(SmallDisk(tmp_path / name, 32))
        return made[-1]

    yield make
    for disk in made:
        disk.close()


def big_export(count: int, seed: int) -> list[str]:
    """Many readings with values that compress badly, so the database needs megabytes for them."""
    rng = random.Random(seed)
    return [MEASUREMENTS_HEADER] + [
        f"{i % 400},Dev {i % 400},2024-03-{1 + i // 400 % 28:02d}T{i // 11200 % 24:02d}:00:00Z,60,1,HQ,"
        f"{rng.random()},{rng.random()},{rng.random()},{rng.random()},{rng.random()}"
        for i in range(count)
    ]


def test_disk_full_under_the_database_nothing_half_written_and_ingested_when_space_returns(
    tmp_path: Path, small_disk: Callable[[str], SmallDisk], serving: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    disk = small_disk("dbdisk")
    db = disk.path / "meterdrop.duckdb"
    server = serving(data, "--db", str(db))
    drop(data, "small.csv", rows("s1", 1.0))
    poll(ingested(db, "small.csv"), "small.csv to be ingested")

    disk.fill(256 * 1024, server)
    drop(data, "big.csv", big_export(150_000, seed=1))
    failed = rf"ERROR meterdrop.watcher: ingest of \S+/big.csv failed \(.*{disk.error}\); trying again in"
    poll(lambda: len(server.logged(failed)) >= 2, "the failure to be logged, and retried", timeout=120)

    # While the disk is full: the ledger has small.csv only (big.csv neither half-written nor
    # rejected: nothing was wrong with its content) and ledger and tables agree.
    assert ledger(db) == {"small.csv": ("ingested", 3, None)}
    assert checked_ok(db).startswith("ok: 1 file(s) (1 ingested), 3 row(s) in 1 table(s)")

    disk.free()
    poll(ingested(db, "small.csv", "big.csv"), "big.csv to be ingested once space returned", timeout=120)
    assert ledger(db)["big.csv"] == ("ingested", 150_000, None)
    with open_store(db, read_only=True, wait=60) as store:
        assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (3 + 150_000,)
    assert checked_ok(db).startswith("ok: 2 file(s) (2 ingested), 150,003 row(s) in 1 table(s)")
    assert server.logged(r"INFO meterdrop.watcher: ingest of \S+/big.csv succeeded on retry"), server.log
    assert server.stop() == 0


def test_disk_full_while_unpacking_a_zip_is_not_a_rejection_of_its_content(
    tmp_path: Path, small_disk: Callable[[str], SmallDisk], serving: Callable[..., Served]
) -> None:
    data = tmp_path / "data"
    scratch = small_disk("tmpdisk")  # ZIP members are unpacked into TMPDIR
    server = serving(data, env={"TMPDIR": str(scratch.path)})
    drop(data, "small.csv", rows("s1", 1.0))
    db = data / "meterdrop.duckdb"
    poll(ingested(db, "small.csv"), "small.csv to be ingested")

    scratch.fill(64 * 1024, server)
    archive = data / "outside" / "export.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("export.csv", "\n".join(big_export(20_000, seed=2)) + "\n")
    os.replace(archive, data / "drop" / "acme" / "export.zip")
    poll(lambda: "export.zip" in ledger(db) or bool(server.logged(r"export.zip failed")),
         "export.zip to be tried")  # fmt: skip
    assert "export.zip" not in ledger(db), ledger(db)  # a full disk says nothing about the file's content
    scratch.free()
    poll(ingested(db, "export.zip"), "export.zip to be ingested once space returned", timeout=120)
    assert checked_ok(db)


# -- clock trouble -------------------------------------------------------------------------------
def test_file_times_in_the_past_or_future_decide_newest_wins_deterministically(
    tmp_path: Path, serving: Callable[..., Served]
) -> None:
    """Version = the file's modification time when first seen, whatever the processing order.

    Arrival order: first (now), backdated (a day before first), future (a year ahead),
    after (a second after first).  future wins: it has the greatest time.  The
    backdated file loses to first although it arrived later.
    """
    data = tmp_path / "data"
    db = data / "meterdrop.duckdb"
    now = float(int(time.time()))
    times = {
        "first.csv": now,
        "backdated.csv": now - 86400,
        "future.csv": now + 365 * 86400,
        "after.csv": now + 1,
    }
    energy = {"first.csv": 1.0, "backdated.csv": 2.0, "future.csv": 3.0, "after.csv": 4.0}
    server = serving(data)
    stored: list[list[Any]] = []
    for name in times:  # one at a time, so each is processed after the one before it
        drop(data, name, rows("7", energy[name]), times[name])
        poll(ingested(db, name), f"{name} to be ingested")
        with open_store(db, read_only=True, wait=60) as store:
            stored.append(
                store.con.execute("SELECT DISTINCT energy_wh FROM panoramic_measurements").fetchall()
            )
    # first, then still first (backdated is older), then future, then still future
    assert stored == [[(1.0,)], [(1.0,)], [(3.0,)], [(3.0,)]]
    with open_store(db, read_only=True, wait=60) as store:
        delivered = dict(store.con.execute("SELECT path, delivered_at FROM files").fetchall())
        table = store.con.execute(
            "SELECT device_id, measurement_time, energy_wh, delivered_at, source_path, source_line "
            "FROM panoramic_measurements ORDER BY ALL"
        ).fetchall()
    drop_folder = data / "drop" / "acme"
    assert {Path(p).name: t for p, t in delivered.items()} == {
        name: datetime.fromtimestamp(t, UTC) for name, t in times.items()
    }  # the version is the file time as found, future or past, never the time of processing
    assert {row[4] for row in table} == {str(drop_folder / "future.csv")}
    assert server.stop() == 0

    # The same four files in other orders, by `meterdrop ingest`: the same table.
    for order in (["after.csv", "future.csv", "backdated.csv", "first.csv"],
                  ["future.csv", "first.csv", "after.csv", "backdated.csv"]):  # fmt: skip
        other = tmp_path / f"{order[0]}.duckdb"
        ingesting = meterdrop("ingest", "--db", str(other), *(str(drop_folder / name) for name in order))
        assert ingesting.returncode == 0, ingesting.stdout + ingesting.stderr
        assert [line.split()[1] for line in ingesting.stdout.splitlines()] == [
            str(drop_folder / name) for name in order
        ]  # processed in the order given
        with duckdb.connect(str(other), read_only=True) as con:
            assert (
                con.execute(
                    "SELECT device_id, measurement_time, energy_wh, delivered_at, source_path, source_line "
                    "FROM panoramic_measurements ORDER BY ALL"
                ).fetchall()
                == table
            ), order

    # Touching a file afterwards does not make it a new delivery: its version stays as first seen.
    os.utime(drop_folder / "first.csv", (now + 2 * 365 * 86400,) * 2)
    again = meterdrop("ingest", "--db", str(db), str(drop_folder / "first.csv"))
    assert again.stdout.startswith("unchanged "), again.stdout
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT DISTINCT energy_wh FROM panoramic_measurements").fetchall() == [(3.0,)]


# -- a file whose ingest raises ----------------------------------------------------------------------
def corrupt_zip(path: Path) -> Path:
    """A ZIP whose deflate stream is damaged: zipfile raises zlib.error, not BadZipFile, on reading it."""
    body = "\n".join(MEASUREMENTS_HEADER.split("\n") + [
        f"{i},d,2024-03-01T00:00:00Z,60,1,HQ,1,230,{i},1,{i}" for i in range(5000)
    ]) + "\n"  # fmt: skip
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.csv", body)
    damaged = bytearray(path.read_bytes())
    for i in range(200, 240):
        damaged[i] ^= 0x5A
    path.write_bytes(bytes(damaged))
    return path


def test_a_file_whose_ingest_raises_does_not_hold_up_the_others(
    tmp_path: Path, serving: Callable[..., Served]
) -> None:
    """Both files are there at start, so the rescan hands them over in one batch, the bad one
    first; the good one must not wait for the next start behind it."""
    data = tmp_path / "data"
    db = data / "meterdrop.duckdb"
    (data / "drop" / "acme").mkdir(parents=True)
    corrupt_zip(data / "drop" / "acme" / "a-damaged.zip")
    drop(data, "b-good.csv", rows("1", 1.0))
    server = serving(data)
    poll(ingested(db, "b-good.csv"), "b-good.csv to be ingested although a-damaged.zip failed before it")
    assert ledger(db).get("a-damaged.zip", ("rejected",))[0] == "rejected"  # never ingested, nor half-written
    assert checked_ok(db).startswith("ok: ")
    assert server.stop() == 0


# -- the watcher's retry, alone ----------------------------------------------------------------
def test_a_failed_batch_is_retried_file_by_file_until_it_succeeds(tmp_path: Path) -> None:
    """A batch that raises is not dropped until the next start; a file that keeps failing
    does not hold up the others."""
    calls: list[list[Path]] = []
    broken = {tmp_path / "a.csv", tmp_path / "poison.csv"}
    done = threading.Event()

    def process(paths: list[Path]) -> None:
        calls.append(paths)
        if broken & set(paths):
            raise OSError(28, "No space left on device")
        if paths == [tmp_path / "a.csv"]:
            done.set()

    watcher = DropWatcher(tmp_path, process, settle=0.1, batch_wait=0.05, retry_first=0.1, retry_max=0.4)
    for name in ("a.csv", "b.csv", "poison.csv"):
        (tmp_path / name).write_text("x")
    watcher.start()
    try:
        poll(lambda: len(calls) >= 4, "the batch to fail and be retried file by file", timeout=30, every=0.05)
        assert sorted(calls[0]) == sorted(broken | {tmp_path / "b.csv"})  # the scan at start: one batch
        assert all(len(c) == 1 for c in calls[1:])  # then each file on its own
        assert [tmp_path / "b.csv"] in calls  # b.csv went through although a.csv and poison.csv failed
        broken.discard(tmp_path / "a.csv")  # space returns for a.csv
        assert done.wait(30)
        tried = len(calls)
        poll(lambda: calls[tried:].count([tmp_path / "poison.csv"]) >= 2, "poison.csv to keep being retried",
             timeout=30, every=0.05)  # fmt: skip
        assert [tmp_path / "a.csv"] not in calls[tried:]  # a.csv succeeded: not tried again
        assert calls[1:].count([tmp_path / "b.csv"]) == 1  # b.csv succeeded on its first retry: once only
    finally:
        watcher.stop()


def test_fresh_deliveries_go_before_the_rest_of_the_start_up_scan(tmp_path: Path) -> None:
    """After a crash the drop folder may hold thousands of files the ledger already has, each
    costing the processor a query to recognise (a 5,000-file rescan took 9 s and new uploads
    waited all of it, bench/chaos_kill.py).  The scan goes newest first, in slices, and a
    fresh delivery goes before the next slice."""
    import processor.watcher as watching

    scanned = [tmp_path / f"old-{i:03d}.csv" for i in range(250)]
    for i, path in enumerate(scanned):
        path.write_text("x")
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))  # old-249 is the newest
    calls: list[list[Path]] = []
    first_slice = threading.Event()
    release = threading.Event()

    def process(paths: list[Path]) -> None:
        calls.append(list(paths))
        if len(calls) == 1:
            first_slice.set()
            assert release.wait(30)

    # settle=30: fresh.csv reaches the worker only through notify(), as a published upload does,
    # not a second time as a hand copy whose size stood still
    watcher = DropWatcher(tmp_path, process, settle=30, batch_wait=0.05)
    watcher.start()
    try:
        assert first_slice.wait(30)
        fresh = tmp_path / "fresh.csv"
        fresh.write_text("x")
        watcher.notify(fresh)
        release.set()
        poll(
            lambda: sum(len(c) for c in calls) >= 251, "every file to be handed over", timeout=30, every=0.05
        )
    finally:
        watcher.stop()
    newest_first = scanned[::-1]
    size = watching.RESCAN_BATCH
    assert calls == [newest_first[:size], [fresh], newest_first[size : 2 * size], newest_first[2 * size :]]
