"""Hostile files through the real command: each refused fast, in bounded memory, with a reason.

Every scenario runs ``meterdrop ingest`` in a child process and measures its wall time and
peak RSS, then reads the ledger: the file must be ``rejected`` with a reason that says what
happened. Peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` taken inside a small launcher
process, never from this test process: Linux carries a parent's RSS high-water mark into a
forked child across ``exec`` (bench/README.md), so measured from pytest (a few hundred MB of
polars and DuckDB already loaded) every child would look as large as pytest itself. The
launcher is a bare Python of about 10 MB, so the figure belongs to ``meterdrop`` alone.

Bounds are generous, for a shared two-core CI machine; what was measured is in
docs/reliability.md and bench/README.md. ``BASELINE`` is the same command on a one-line
valid file, so "bounded" means "close to what meterdrop needs anyway".

The tests at the end are defects the fuzzer found outside the parsers (an empty frame
merged, ZIP member names, a ZIP refused part way, a ZIP of refused members recorded as
ingested), fixed since.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from processor.csvfile import HEADER_LIMIT
from processor.ingest import Ingester, Limits
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER

MiB = 1024 * 1024
GiB = 1024 * MiB
ROW = "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3"
DTD_NOT_ALLOWED = "DTD not allowed: Green Button XML must not declare a DOCTYPE or entities"
ESPI_ROOT = '<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi">'

# Runs the command given as arguments and reports, as JSON, its exit status, wall time and
# peak RSS (ru_maxrss is in KiB on Linux). Kept tiny on purpose: see the module docstring.
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.monotonic()
done = subprocess.run(sys.argv[1:], capture_output=True)
print(json.dumps({
    "code": done.returncode, "seconds": time.monotonic() - started,
    "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    "stdout": done.stdout.decode(errors="replace")[-3000:], "stderr": done.stderr.decode(errors="replace")[-3000:],
}))
"""


@dataclass(frozen=True)
class Run:
    """One ``meterdrop ingest`` child: what it printed, how long it took, its peak RSS, the ledger."""

    code: int
    seconds: float
    peak_rss: int
    stdout: str
    stderr: str
    ledger: list[tuple[str, str, str | None]]  # (path, status, error) in id order

    def only(self) -> tuple[str, str, str | None]:
        assert len(self.ledger) == 1, self.ledger
        return self.ledger[0]


def meterdrop_ingest(tmp_path: Path, *paths: Path, extra: tuple[str, ...] = (), timeout: float = 600) -> Run:
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "meterdrop", "ingest", "--data-dir", str(data_dir), *extra,
               *(str(p) for p in paths)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    report = json.loads(done.stdout)
    with duckdb.connect(str(data_dir / "meterdrop.duckdb"), read_only=True) as con:
        ledger = con.execute("SELECT path, status, error FROM files ORDER BY id").fetchall()
    return Run(report["code"], report["seconds"], report["rss"], report["stdout"], report["stderr"], ledger)


def reading_rows(tmp_path: Path) -> int:
    with duckdb.connect(str(tmp_path / "data" / "meterdrop.duckdb"), read_only=True) as con:
        tables = [
            t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall() if t != "files"
        ]
        return sum(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables if t != "meterdrop_meta"
        )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``meterdrop ingest`` of a valid one-line file: the memory and time every run needs anyway."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    path = tmp_path / "ok.csv"
    path.write_text(f"{MEASUREMENTS_HEADER}\n{ROW}\n")
    run = meterdrop_ingest(tmp_path, path)
    assert (run.code, run.only()[1]) == (0, "ingested")
    return run


def assert_bounded(
    run: Run, baseline: Run, *, extra_rss: int = 256 * MiB, extra_seconds: float = 10.0
) -> None:
    """Peak RSS within ``extra_rss`` of the baseline, wall time within ``extra_seconds`` of it."""
    assert run.peak_rss < baseline.peak_rss + extra_rss, (
        f"peak RSS {run.peak_rss / MiB:.0f} MiB, baseline {baseline.peak_rss / MiB:.0f} MiB"
    )
    assert run.seconds < baseline.seconds + extra_seconds, (
        f"{run.seconds:.1f} s, baseline {baseline.seconds:.1f} s"
    )


def rejected(run: Run, reason_start: str) -> str:
    """The one file is ledgered as rejected with this reason, and the command says so (exit 1)."""
    _, status, error = run.only()
    assert (status, run.code) == ("rejected", 1), (status, error, run.stderr)
    assert error is not None and error.startswith(reason_start), error
    assert "rejected" in run.stdout
    return error


# --------------------------------------------------------------------------- XML


def test_billion_laughs(tmp_path: Path, baseline: Run) -> None:
    entities = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    path = tmp_path / "laughs.xml"
    path.write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE feed [<!ENTITY lol0 "lol">{entities}]>\n{ESPI_ROOT}<title>&lol9;</title></feed>\n'
    )
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, DTD_NOT_ALLOWED)
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_billion_laughs_behind_a_70_kib_comment(tmp_path: Path, baseline: Run) -> None:
    """Past the 64 KiB head the first check cannot see the DOCTYPE; the parser's chunk scan does."""
    entities = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    comment = f"<!-- http://naesb.org/espi http://www.w3.org/2005/Atom {'x' * 70_000} -->"
    path = tmp_path / "laughs.xml"
    path.write_text(
        f'<?xml version="1.0"?>\n{comment}\n<!DOCTYPE feed [<!ENTITY lol0 "lol">{entities}]>\n'
        f"{ESPI_ROOT}<title>&lol9;</title></feed>\n"
    )
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, DTD_NOT_ALLOWED)
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A local TCP port that records whether anything connected (an external DTD or entity fetch)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def connections(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            client, _ = server.accept()
        except BlockingIOError:
            return count
        client.close()
        count += 1


@pytest.mark.parametrize("hidden", [False, True], ids=["in-the-head", "behind-a-70-KiB-comment"])
def test_external_entity_file_etc_passwd(tmp_path: Path, baseline: Run, hidden: bool) -> None:
    comment = f"<!-- http://naesb.org/espi {'x' * 70_000} -->\n" if hidden else ""
    path = tmp_path / "xxe.xml"
    path.write_text(
        f'<?xml version="1.0"?>\n{comment}<!DOCTYPE feed [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
        f"{ESPI_ROOT}<title>&x;</title></feed>\n"
    )
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, DTD_NOT_ALLOWED)
    assert "root:" not in run.stdout + run.stderr
    assert reading_rows(tmp_path) == 0
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


@pytest.mark.parametrize("hidden", [False, True], ids=["in-the-head", "behind-a-70-KiB-comment"])
@pytest.mark.parametrize("declaration", ["external-dtd", "parameter-entity"])
def test_external_dtd_is_never_fetched(
    tmp_path: Path, baseline: Run, listener: socket.socket, hidden: bool, declaration: str
) -> None:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/evil.dtd"
    doctype = {
        "external-dtd": f'<!DOCTYPE feed SYSTEM "{url}">',
        "parameter-entity": f'<!DOCTYPE feed [<!ENTITY % remote SYSTEM "{url}"> %remote;]>',
    }[declaration]
    comment = f"<!-- http://naesb.org/espi {'x' * 70_000} -->\n" if hidden else ""
    path = tmp_path / "dtd.xml"
    path.write_text(f'<?xml version="1.0"?>\n{comment}{doctype}\n{ESPI_ROOT}</feed>\n')
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, DTD_NOT_ALLOWED)
    assert connections(listener) == 0
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


# --------------------------------------------------------------------------- ZIP


def zeros_member(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """A member of ``size`` zero bytes, written in pieces (the test itself stays small)."""
    with archive.open(name, "w", force_zip64=size > 2 * GiB) as member:  # the archive's compression
        chunk = b"0" * MiB
        for _ in range(size // MiB):
            member.write(chunk)


def test_zip_bomb_by_ratio(tmp_path: Path, baseline: Run) -> None:
    """A 1 MB download that would expand to 1 GiB (ratio about 1000)."""
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        zeros_member(archive, "usage.csv", GiB)
    assert path.stat().st_size < 2 * MiB
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "zip bomb refused: member 'usage.csv' expands 1,0")
    assert reading_rows(tmp_path) == 0
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_zip_bomb_that_understates_its_size(tmp_path: Path, baseline: Run) -> None:
    """The central directory claims 1 KB; the data inflates to 256 MiB. Reading stops at the claim."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        zeros_member(archive, "usage.csv", 256 * MiB)
    data = bytearray(buffer.getvalue())
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.find(signature) + offset
        data[at : at + 4] = (1000).to_bytes(4, "little")
    path = tmp_path / "liar.zip"
    path.write_bytes(bytes(data))
    run = meterdrop_ingest(tmp_path, path)
    error = rejected(
        run, "unreadable ZIP"
    )  # "unreadable ZIP member 'usage.csv': ..." since ingest.py names it
    assert error.endswith("Bad CRC-32 for file 'usage.csv'"), error
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_nested_zip_bomb_42_zip_made_small(tmp_path: Path, baseline: Run) -> None:
    """42.zip's shape (16 copies, 4 zip levels, a big leaf) at 1/16 of its leaf: unpacked fully it
    would be 16**4 x 256 MiB = 16 TiB. The fourth level is refused as nested too deep, so no
    level has a member that could be ingested and each is rejected; the copies are one content,
    so after the first of each level they are refused without being unpacked again."""
    leaf = io.BytesIO()
    with zipfile.ZipFile(leaf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        zeros_member(archive, "0.csv", 256 * MiB)
    data = leaf.getvalue()
    for _ in range(4):
        level = io.BytesIO()
        with zipfile.ZipFile(level, "w", zipfile.ZIP_DEFLATED) as archive:
            for i in range(16):
                archive.writestr(f"{i}.zip", data)
        data = level.getvalue()
    path = tmp_path / "42.zip"
    path.write_bytes(data)
    assert path.stat().st_size < 64 * 1024
    run = meterdrop_ingest(tmp_path, path)
    statuses = [status for _, status, _ in run.ledger]
    deepest = [(p, e) for p, s, e in run.ledger if p.count("!") == 3]  # 42.zip!0.zip!0.zip!i.zip
    assert run.code == 1
    assert len(run.ledger) == 1 + 3 * 16  # the archive and 16 members on each of 3 levels: not 16**4
    assert set(statuses) == {"rejected"}
    assert deepest[0][1] == "ZIP nested more than 3 levels deep"
    assert all(e.startswith("same content as ") for _, e in deepest[1:])  # copies: not unpacked again
    top = next(e for p, _, e in run.ledger if "!" not in p)
    assert top.startswith("no member could be ingested (16 rejected)")
    assert reading_rows(tmp_path) == 0
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=10)


# --------------------------------------------------------------------------- big and binary files


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_10_gib_sparse_file_is_refused_unread_by_the_default_limit(tmp_path: Path, baseline: Run) -> None:
    path = sparse(tmp_path / "huge.csv", 10 * GiB)
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, f"file of {10 * GiB:,} bytes is over the {4 * GiB:,}-byte limit")
    assert_bounded(run, baseline, extra_rss=32 * MiB, extra_seconds=3)
    # The refusal itself, without Python's start-up: well under a second.
    with Store(tmp_path / "inprocess.duckdb") as store:
        started = time.perf_counter()
        outcome = Ingester(store).ingest(path)
        assert time.perf_counter() - started < 0.5
    assert outcome.status == "rejected"


def test_10_gib_sparse_file_under_a_raised_limit_is_refused_as_binary_without_reading_it(
    tmp_path: Path, baseline: Run
) -> None:
    """With --max-file-size 20G the file is allowed in, and refused as binary from its first
    bytes before it is hashed (hashing it whole took about 23 s here, for the same answer)."""
    path = sparse(tmp_path / "huge.csv", 10 * GiB)
    run = meterdrop_ingest(tmp_path, path, extra=("--max-file-size", "20G"))
    rejected(run, "unrecognised format: binary data (starts with 00 00 00 00 00 00 00 00)")
    assert_bounded(run, baseline, extra_rss=32 * MiB, extra_seconds=240)
    with Store(tmp_path / "inprocess.duckdb") as store:
        outcome = Ingester(store, limits=Limits(max_file_bytes=20 * GiB)).ingest(path)
        # not hashed: the proof that it was not read, without timing it
        assert store.con.execute("SELECT status, sha256 FROM files").fetchall() == [("rejected", "unread")]
    assert outcome.detail == "unrecognised format: binary data (starts with 00 00 00 00 00 00 00 00)"


def test_a_small_binary_file_is_still_hashed_and_refused(tmp_path: Path) -> None:
    """Below 64 MiB hashing costs nothing worth saving: the ledger keeps the file's sha256."""
    path = tmp_path / "small.bin"
    path.write_bytes(b"\x00\x01" * 1000)
    with Store(tmp_path / "m.duckdb") as store:
        assert Ingester(store).ingest(path).status == "rejected"
        (sha,) = store.con.execute("SELECT sha256 FROM files").fetchone() or ("",)
    assert len(sha) == 64


def test_csv_with_a_100_mb_line(tmp_path: Path, baseline: Run) -> None:
    """A valid header, a valid line, then one 100 MB line of 11 fields: refused, naming line 3."""
    path = tmp_path / "long.csv"
    with path.open("w") as f:
        f.write(f"{MEASUREMENTS_HEADER}\n{ROW}\n2,")
        for _ in range(100):
            f.write("x" * 1_000_000)
        f.write(",2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3\n" + ROW + "\n")
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "line 3: line longer than 64 MiB without a line break outside quotes")
    assert reading_rows(tmp_path) == 0
    # Measured 342 MiB (baseline 188 MiB: two 64 MiB reads and their join on top); 1.5 GiB allowed.
    assert run.peak_rss < 1.5 * GiB, f"{run.peak_rss / MiB:.0f} MiB"
    assert_bounded(run, baseline, extra_rss=1.5 * GiB - baseline.peak_rss, extra_seconds=20)


def test_csv_whose_last_100_mb_line_never_ends(tmp_path: Path, baseline: Run) -> None:
    """The same without any line break after the header: refused, in bounded memory (a file
    over ``ONE_PIECE_BYTES`` is read no further than 64 MiB into such a line)."""
    path = tmp_path / "endless.csv"
    with path.open("w") as f:
        f.write(f"{MEASUREMENTS_HEADER}\n")
        for _ in range(100):
            f.write("9" * 1_000_000)
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "line 2: line longer than 64 MiB")
    assert run.peak_rss < 1.5 * GiB, f"{run.peak_rss / MiB:.0f} MiB"


def test_oversized_utility_csv(tmp_path: Path, baseline: Run) -> None:
    """40 MB of PG&E rows: parsed whole it would need about 1.4 GiB, so it is refused first."""
    path = tmp_path / "pge.csv"
    row = "Electric usage,2025-03-20,00:00,00:59,2.94,kWh,$1.02,\n"
    with path.open("w") as f:
        f.write("Name,JOHN DOE\nAccount Number,1\n\nTYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES\n")
        f.write(row * (40 * 10**6 // len(row)))
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, f"utility CSV download of {path.stat().st_size:,} bytes is over the 33,554,432 bytes")
    # The ingester reads the file into memory before the parser sees it (see the report): 40 MB.
    assert_bounded(run, baseline, extra_rss=128 * MiB, extra_seconds=10)


def test_binary_garbage_named_csv(tmp_path: Path, baseline: Run) -> None:
    path = tmp_path / "export.csv"
    data = random.Random(5).randbytes(8 * MiB)
    path.write_bytes(data)
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, f"unrecognised format: binary data (starts with {data[:8].hex(' ')})")
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_an_executable_named_csv(tmp_path: Path, baseline: Run) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(Path(sys.executable).resolve().read_bytes())
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "unrecognised format: binary data (starts with 7f 45 4c 46")  # ELF
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_random_bytes_without_nuls_named_csv(tmp_path: Path, baseline: Run) -> None:
    """No NUL, so not 'binary data': the header check refuses it (a first line that is not UTF-8)."""
    rng = random.Random(7)
    data = bytes(rng.randrange(1, 256) for _ in range(256 * 1024)) * 32  # 8 MiB
    assert b"\x00" not in data and b"\n" in data[:HEADER_LIMIT]
    path = tmp_path / "export.csv"
    path.write_bytes(data)
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "unrecognised format: first line is not UTF-8 text")
    assert_bounded(run, baseline, extra_rss=64 * MiB, extra_seconds=5)


def test_random_text_without_line_breaks_named_csv(tmp_path: Path, baseline: Run) -> None:
    """Printable ASCII with no line break at all: no header line in the first 64 KiB."""
    rng = random.Random(8)
    path = tmp_path / "export.csv"
    path.write_bytes(bytes(rng.randrange(32, 127) for _ in range(1024 * 1024)))
    run = meterdrop_ingest(tmp_path, path)
    rejected(run, "unrecognised format: no line break in the first 65536 bytes")


# --------------------------------------------------------------------------- known defects (not in the parsers)


def _archive_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out.getvalue()


def test_utility_csv_without_readings_is_ingested(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("TYPE,DATE,START TIME,END TIME,USAGE (kWh),NOTES\n")
    with Store(tmp_path / "db.duckdb") as store:
        outcome = Ingester(store, timezone="America/New_York").ingest(path)
    assert (outcome.status, outcome.rows) == ("ingested", 0)


@pytest.mark.parametrize(
    "damage",
    ["corrupt-lzma-data", "name-not-utf8", "empty-name"],
)  # fmt: skip
def test_zip_with_a_broken_member_is_rejected(tmp_path: Path, damage: str) -> None:
    content = f"{MEASUREMENTS_HEADER}\n{ROW}\n".encode() * 50
    if damage == "empty-name":  # the fuzzer's find: a member named ""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr(zipfile.ZipInfo(""), content)
        data = bytearray(out.getvalue())
    elif damage == "corrupt-lzma-data":
        data = bytearray(_archive_bytes({"usage.csv": content}, zipfile.ZIP_LZMA))
        start = data.find(b"PK\x03\x04") + 30 + len("usage.csv") + 20  # inside the compressed data
        data[start : start + 16] = b"\xff" * 16
    else:  # the fuzzer's find: general purpose bit 11 (name is UTF-8) set, and a name that is not
        data = bytearray(_archive_bytes({"usage.csv": content}, zipfile.ZIP_STORED))
        local = data.find(b"PK\x03\x04")
        data[local + 7] |= 0x08
        data[local + 30] = 0xBA
    path = tmp_path / "corrupt.zip"
    path.write_bytes(bytes(data))
    with Store(tmp_path / "db.duckdb") as store:
        outcome = Ingester(store).ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail is not None and outcome.detail.startswith("unreadable ZIP")


def test_a_zip_rejected_part_way_leaves_no_member_behind(tmp_path: Path) -> None:
    good = f"{MEASUREMENTS_HEADER}\n{ROW}\n".encode()
    data = bytearray(
        _archive_bytes({"a.csv": good, "b.csv": good.replace(b"1,a", b"2,b")}, zipfile.ZIP_STORED)
    )
    second = data.find(b"PK\x03\x04", 4) + 30 + len("b.csv")
    data[second] ^= 0xFF  # b.csv's content no longer matches its CRC
    path = tmp_path / "partial.zip"
    path.write_bytes(bytes(data))
    with Store(tmp_path / "db.duckdb") as store:
        outcome = Ingester(store).ingest(path)
        assert outcome.status == "rejected"
        assert store.con.execute("SELECT count(*) FROM files WHERE path LIKE '%!%'").fetchone() == (0,)
        assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)


def test_a_zip_of_only_refused_members_is_rejected(tmp_path: Path) -> None:
    inner = _archive_bytes({"x.csv": b"x"})
    for _ in range(4):
        inner = _archive_bytes({"deeper.zip": inner})
    path = tmp_path / "deep.zip"
    path.write_bytes(inner)
    with Store(tmp_path / "db.duckdb") as store:
        outcome = Ingester(store).ingest(path)
    assert outcome.status == "rejected"


def test_a_named_pipe_in_a_folder_is_rejected_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO waits for a writer; one dropped in a folder must not stop the others."""
    folder = tmp_path / "drop"
    folder.mkdir()
    os.mkfifo(folder / "b.csv")
    for name in ("a.csv", "c.csv"):
        (folder / name).write_text(
            f"{MEASUREMENTS_HEADER}\n{ROW.replace('1,', '2,', 1) if name == 'c.csv' else ROW}\n"
        )
    run = meterdrop_ingest(tmp_path, folder, timeout=60)  # a wait for a writer would never end
    assert run.code == 1, run.stderr
    assert [(Path(p).name, s, e) for p, s, e in run.ledger] == [
        ("a.csv", "ingested", None),
        ("b.csv", "rejected", "not a regular file (a named pipe, socket or device): not read"),
        ("c.csv", "ingested", None),
    ]
