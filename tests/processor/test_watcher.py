"""The drop-folder watcher hands over complete files only, once each, and misses none."""

from __future__ import annotations

import os
import queue
import shutil
import time
from pathlib import Path

from processor.watcher import DropWatcher


def collecting(root: Path, settle: float = 0.3) -> tuple[DropWatcher, queue.Queue[Path]]:
    seen: queue.Queue[Path] = queue.Queue()
    watcher = DropWatcher(root, lambda paths: [seen.put(p) for p in paths], settle=settle, batch_wait=0.05)
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
