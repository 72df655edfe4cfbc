"""The drop-folder watcher hands over complete files only, once each, and misses none."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path

from processor.watcher import PENDING, DropWatcher


def collecting(root: Path, settle: float = 0.3) -> tuple[DropWatcher, queue.Queue[Path]]:
    """A watcher whose batches put each file's delivered path (not the link it is read from) in a queue."""
    seen: queue.Queue[Path] = queue.Queue()

    def take(paths: list[Path]) -> None:
        for path in paths:
            seen.put(watcher.delivered(path))

    watcher = DropWatcher(root, take, settle=settle, batch_wait=0.05)
    return watcher, seen


def next_paths(seen: queue.Queue[Path], count: int, timeout: float = 10) -> list[Path]:
    return sorted(seen.get(timeout=timeout) for _ in range(count))


def test_files_present_at_start_are_taken(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.csv").write_text("x")
    (tmp_path / ".hidden.part-1").write_text("x")
    watcher, seen = collecting(tmp_path)
    watcher.start()
    try:
        assert next_paths(seen, 1) == [tmp_path / "a" / "one.csv"]
        assert seen.empty()
    finally:
        watcher.stop()


def test_hand_copy_rename_in_and_publish_are_each_taken_once(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    watcher, seen = collecting(root)
    watcher.start()
    try:
        copied = root / "hand.csv"
        with copied.open("w") as f:  # a writer: ready when it closes
            f.write("a,b\n")
            f.flush()
            f.write("1,2\n")
        assert next_paths(seen, 1) == [copied]

        outside = tmp_path / "outside.csv"
        outside.write_text("x")
        shutil.move(str(outside), root / "moved.csv")  # appears whole, by rename
        assert next_paths(seen, 1) == [root / "moved.csv"]

        partial = root / "sub" / ".upload.csv.part-ab12"
        partial.parent.mkdir()
        partial.write_text("uploading")
        os.replace(partial, root / "sub" / "upload.csv")  # what the servers do on completion
        assert next_paths(seen, 1) == [root / "sub" / "upload.csv"]
        watcher.notify(root / "sub" / ".other.part-1")  # hidden: never handed over
    finally:
        watcher.stop()
    assert seen.empty()


def test_a_failing_batch_does_not_stop_the_watcher(tmp_path: Path) -> None:
    calls: queue.Queue[list[Path]] = queue.Queue()

    def process(paths: list[Path]) -> None:
        calls.put(paths)
        if len(calls.queue) == 1:
            raise RuntimeError("database unavailable")

    watcher = DropWatcher(tmp_path, process, settle=0.3, batch_wait=0.05)
    watcher.start()
    try:
        (tmp_path / "first.csv").write_text("x")
        assert calls.get(timeout=10) == [tmp_path / "first.csv"]
        (tmp_path / "second.csv").write_text("x")
        assert calls.get(timeout=10) == [tmp_path / "second.csv"]
    finally:
        watcher.stop()


def test_client_temporary_names_wait_for_their_rename(tmp_path: Path) -> None:
    watcher, seen = collecting(tmp_path)
    watcher.start()
    try:
        temporary = tmp_path / "export.csv.tmp"
        temporary.write_text("a,b\n")
        os.replace(temporary, tmp_path / "export.csv")
        assert next_paths(seen, 1) == [tmp_path / "export.csv"]
    finally:
        watcher.stop()
    assert seen.empty()


def test_a_file_written_by_several_writers_in_turn_is_taken_once_complete(tmp_path: Path) -> None:
    contents: queue.Queue[str] = queue.Queue()
    watcher = DropWatcher(tmp_path, lambda paths: [contents.put(p.read_text()) for p in paths], settle=1.0,
                          batch_wait=0.05)  # fmt: skip
    watcher.start()
    try:
        slow = tmp_path / "slow.csv"
        for part in ("a,b\n", "1,2\n", "3,4\n"):  # a slow writer: three sessions, 0.3 s apart
            with slow.open("a") as f:
                f.write(part)
            time.sleep(0.3)  # the slowness being simulated, not a wait for the watcher
        assert contents.get(timeout=10) == "a,b\n1,2\n3,4\n"
    finally:
        watcher.stop()
    assert contents.empty()


def test_a_delivery_replaced_before_its_turn_is_still_handed_over(tmp_path: Path) -> None:
    """An export job delivering the same name twice while the worker is busy: both deliveries count."""
    root = tmp_path / "drop"
    busy, read = threading.Event(), queue.Queue()

    def process(paths: list[Path]) -> None:
        for path in paths:
            read.put((watcher.delivered(path), path.read_text(), path.stat().st_mtime_ns))
        busy.wait(10)  # the first batch holds the worker while the name is delivered twice

    watcher = DropWatcher(root, process, batch_wait=0.05)
    watcher.start()
    try:
        report = root / "acme" / "report.csv"
        report.parent.mkdir(parents=True)
        first, second = root / "acme" / ".report.csv.part-1", root / "acme" / ".report.csv.part-2"
        (root / "acme" / ".warm-up.part").write_text("w")
        os.replace(
            root / "acme" / ".warm-up.part", root / "acme" / "warm-up.csv"
        )  # published, as by a server
        watcher.notify(root / "acme" / "warm-up.csv")
        assert read.get(timeout=10)[0] == root / "acme" / "warm-up.csv"  # the worker is now busy
        first.write_text("first delivery")
        os.utime(first, ns=(1, 10**18))
        os.replace(first, report)
        watcher.notify(report)
        second.write_text("second delivery")
        watcher.keep(report)  # what the servers do before they replace a file (drops.replace_into)
        os.replace(second, report)  # the same name again, before the first one's turn
        watcher.notify(report)
        busy.set()
        got = {read.get(timeout=10)[:2] for _ in range(2)}
        assert got == {(report, "first delivery"), (report, "second delivery")}
    finally:
        busy.set()
        watcher.stop()
    assert report.read_text() == "second delivery"
    assert list((root / PENDING).iterdir()) == []  # the link goes once its file is handed over


def test_a_kept_delivery_keeps_its_own_delivery_time(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    report = root / "acme" / "report.csv"
    report.parent.mkdir(parents=True)
    report.write_text("earlier delivery")
    os.utime(report, ns=(1, 10**18))
    watcher = DropWatcher(root, lambda paths: None)
    watcher.keep(report)
    (kept,) = [p for p in (root / PENDING).rglob("*") if p.is_file()]
    assert watcher.delivered(kept) == report
    assert kept.read_text() == "earlier delivery" and kept.stat().st_mtime_ns == 10**18
    watcher.keep(root / "acme" / "missing.csv")  # nothing there to keep: nothing happens
    assert len([p for p in (root / PENDING).rglob("*") if p.is_file()]) == 1


def test_links_left_by_a_stop_are_taken_at_the_next_start(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    kept = root / PENDING / "17f0-3" / "acme" / "sub" / "late.csv"
    kept.parent.mkdir(parents=True)
    kept.write_text("published, not ingested before the stop")
    watcher, seen = collecting(root)
    watcher.start()
    try:
        assert next_paths(seen, 1) == [root / "acme" / "sub" / "late.csv"]
    finally:
        watcher.stop()
    assert not kept.exists() and list((root / PENDING).iterdir()) == []


def test_symlinks_planted_in_the_drop_folder_are_never_taken(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("not a delivery")
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "at-start.csv").symlink_to(secret)
    (root / "linked-folder").symlink_to(secret.parent, target_is_directory=True)
    watcher, seen = collecting(root)
    watcher.start()
    try:
        (root / "acme" / "later.csv").symlink_to(secret)
        watcher.notify(root / "acme" / "later.csv")
        watcher.notify(root / "linked-folder" / "secret.csv")
        (root / "acme" / "real.csv").write_text("a delivery")
        assert next_paths(seen, 1) == [root / "acme" / "real.csv"]  # and nothing before it
        assert seen.empty()
    finally:
        watcher.stop()
