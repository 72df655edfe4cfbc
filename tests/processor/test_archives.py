"""ZIP downloads: one delivery, each member a file of its own; bombs and path tricks refused."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from processor.ingest import Ingester, Limits
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, at
from tests.processor.test_greenbutton_xml import SAMPLES, feed


def make_zip(path: Path, members: dict[str, bytes], *, mtime: str = "2024-05-01 00:00") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    stamp = at(mtime).timestamp()
    os.utime(path, (stamp, stamp))
    return path


CSV = (MEASUREMENTS_HEADER + "\n1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3\n").encode()


def test_members_are_ledgered_as_archive_bang_member(tmp_path: Path, store: Store, ingest) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("deep/gas.xml", (SAMPLES / "ngma_gas_provider_2024-07-16.xml").read_bytes())
    archive = make_zip(tmp_path / "download.zip", {
        "electric.xml": feed("", "espi").encode(),
        "panoramic/export.csv": CSV,
        "nested.zip": inner.getvalue(),
        "notes.txt": b"hello\n",
    })  # fmt: skip
    outcome = ingest(archive)
    assert (outcome.status, outcome.format) == ("ingested", "zip")
    assert [(m.path, m.status) for m in outcome.members] == [
        (f"{archive}!electric.xml", "ingested"),
        (f"{archive}!panoramic/export.csv", "ingested"),
        (f"{archive}!nested.zip", "ingested"),
        (f"{archive}!notes.txt", "rejected"),
    ]
    assert outcome.members[2].members[0].path == f"{archive}!nested.zip!deep/gas.xml"
    ledger = dict(store.con.execute("SELECT path, status FROM files").fetchall())
    assert ledger == {
        str(archive): "ingested",
        f"{archive}!electric.xml": "ingested",
        f"{archive}!panoramic/export.csv": "ingested",
        f"{archive}!nested.zip": "ingested",
        f"{archive}!nested.zip!deep/gas.xml": "ingested",
        f"{archive}!notes.txt": "rejected",
    }
    # Members are delivered when the archive was.
    assert store.con.execute("SELECT DISTINCT delivered_at FROM files").fetchall() == [
        (at("2024-05-01 00:00"),)
    ]
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (1,)
    assert store.con.execute("SELECT note FROM files WHERE path = ?", [str(archive)]).fetchone() == (
        "4 member(s): 3 ingested, 1 rejected",)  # fmt: skip
    again = ingest(archive)
    assert again.status == "unchanged"


def test_member_names_never_become_paths(tmp_path: Path, store: Store, ingest) -> None:
    archive = make_zip(tmp_path / "evil.zip", {"../../escaped.csv": CSV, "/etc/absolute.csv": CSV})
    outcome = ingest(archive)
    assert [m.status for m in outcome.members] == ["ingested", "duplicate"]
    assert not (tmp_path.parent / "escaped.csv").exists()
    assert not Path("/etc/absolute.csv").exists()
    assert not list(tmp_path.glob("**/escaped.csv"))


def test_hidden_members_are_skipped_as_in_folders(tmp_path: Path, store: Store, ingest) -> None:
    """A ZIP made on a Mac carries __MACOSX/._name copies and .DS_Store: they are not deliveries."""
    archive = make_zip(tmp_path / "mac.zip", {
        "usage.csv": CSV, "__MACOSX/._usage.csv": b"\x00\x05\x16\x07 resource fork", ".DS_Store": b"Bud1\x00",
        "sub/.hidden.csv": CSV,
    })  # fmt: skip
    outcome = ingest(archive)
    assert outcome.status == "ingested"
    assert [(m.path.rsplit("!", 1)[1], m.status) for m in outcome.members] == [("usage.csv", "ingested")]
    assert store.con.execute("SELECT note FROM files WHERE path = ?", [str(archive)]).fetchone() == (
        "1 member(s): 1 ingested; skipped 3 hidden member(s): __MACOSX/._usage.csv, .DS_Store, sub/.hidden.csv",
    )
    assert store.con.execute("SELECT count(*) FROM files WHERE path LIKE '%!%'").fetchone() == (1,)


def test_zip_bomb_by_ratio_is_refused(tmp_path: Path, store: Store, ingest) -> None:
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.csv": b"0" * (50 * 1024 * 1024)})
    outcome = ingest(archive)
    assert outcome.status == "rejected"
    assert outcome.detail.startswith("zip bomb refused: member 'zeros.csv' expands")
    assert store.con.execute("SELECT count(*) FROM files").fetchone() == (1,)


def test_zip_bomb_by_total_size_is_refused(tmp_path: Path, store: Store) -> None:
    archive = make_zip(tmp_path / "big.zip", {f"m{i}.csv": CSV for i in range(3)})
    outcome = Ingester(store, limits=Limits(max_archive_bytes=2 * len(CSV))).ingest(archive)
    assert outcome.status == "rejected"
    assert outcome.detail == f"zip bomb refused: {3 * len(CSV):,} bytes uncompressed (limit {2 * len(CSV):,})"


def test_corrupt_zip_is_rejected(tmp_path: Path, ingest) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    outcome = ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail.startswith("unreadable ZIP:")


@pytest.mark.parametrize("depth_limit", [1])
def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path, store: Store, depth_limit: int) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("x.csv", CSV)
    archive = make_zip(tmp_path / "outer.zip", {"inner.zip": inner.getvalue()})
    outcome = Ingester(store, limits=Limits(max_archive_depth=depth_limit)).ingest(archive)
    assert outcome.members[0].status == "rejected"
    assert outcome.members[0].detail == "ZIP nested more than 1 levels deep"


def test_oversized_file_is_refused_without_reading(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "huge.csv"
    with path.open("wb") as f:
        f.truncate(10 * 1024**3)  # a 10 GB sparse file
    outcome = Ingester(store).ingest(path)
    assert outcome.status == "rejected"
    assert outcome.detail == f"file of {10 * 1024**3:,} bytes is over the {4 * 1024**3:,}-byte limit"


def _patched(data: bytes, field: str, value: bytes) -> bytes:
    """Change a field in both the local header (PK\\3\\4) and the central directory (PK\\1\\2)."""
    out = bytearray(data)
    local, central = out.find(b"PK\x03\x04"), out.find(b"PK\x01\x02")
    fields = {"version": (4, 6), "flags": (6, 8), "method": (8, 10)}  # the CD has 2 more bytes before them
    start, end = fields[field]
    out[local + start : local + end] = value
    out[central + start + 2 : central + end + 2] = value
    return bytes(out)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d[:60] + bytes(b ^ 0x5A for b in d[60:100]) + d[100:], "unreadable ZIP"),
        (lambda d: _patched(d, "flags", b"\x01\x00"), "encrypted"),
        (lambda d: _patched(d, "method", b"\x09\x00"), "compression method"),
        (lambda d: _patched(d, "version", b"\xbf\x00"), "zip file version 19.1"),  # the fuzzer's find
    ],
    ids=["damaged-deflate-stream", "encrypted-member", "deflate64-member", "future-zip-version"],
)
def test_damaged_encrypted_or_unsupported_members_reject_the_zip(
    tmp_path: Path, store: Store, ingest, damage, reason: str
) -> None:
    """These raised out of ingest (zlib.error, RuntimeError, NotImplementedError) and left the
    file unledgered, retried for ever; now the ZIP is rejected with a reason."""
    body = (MEASUREMENTS_HEADER + "\n" + "".join(
        f"{i},d,2024-03-01T00:00:00Z,60,1,HQ,1,230,{i},1,{i}\n" for i in range(2000))).encode()  # fmt: skip
    archive = make_zip(tmp_path / "a.zip", {"a.csv": body})
    archive.write_bytes(damage(archive.read_bytes()))
    outcome = ingest(archive)
    assert outcome.status == "rejected" and reason in (outcome.detail or ""), outcome.detail
    assert store.con.execute("SELECT status FROM files").fetchall() == [("rejected",)]
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)


def test_a_full_disk_while_unpacking_is_not_a_rejection(
    tmp_path: Path, store: Store, ingest, monkeypatch
) -> None:
    """Out of space for the member's copy is the machine's trouble: it is raised (the watcher
    tries again later), and nothing is recorded against the file."""
    archive = make_zip(tmp_path / "a.zip", {"a.csv": CSV})
    real_open = Path.open

    def full(self: Path, mode: str = "r", *args, **kwargs):
        if "w" in mode and self.name.startswith("member-"):
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OSError, match="No space left"):
        ingest(archive)
    monkeypatch.undo()
    assert store.con.execute("SELECT count(*) FROM files").fetchone() == (0,)
    assert ingest(archive).status == "ingested"
