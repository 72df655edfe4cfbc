"""Fixtures shared by the test suite: real files on disk, a real DuckDB database."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processor.ingest import Ingester, Outcome
from processor.store import Store

MEASUREMENTS_HEADER = (
    "device_id, device_name, measurement_time(UTC), resolution(minutes), site_id, site_name, "
    "current(A), voltage(V), power(W), power_factor, energy(Wh)"
)
PAN42_HEADER = (
    "device_id, device_name, measurement_time(UTC), resolution(minutes), site_id, site_name, phase, "
    "current(A), voltage(V), power(W), power_factor, energy(Wh), reactive power(VAR), "
    "consumed active energy(Wh), frequency(Hz)"
)
PULSE_HEADER = (
    "Meter_id, Meter_type, Meter_name, Meter_Unit, measurement_time(UTC), resolution(minutes), "
    "site_id, site_name, power(W), energy(Wh), Flow, Volume"
)

SHARED = Path(__file__).resolve().parents[2] / "shared"


def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (synchronisation, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def free_port_range(count: int) -> range:
    """``count`` consecutive loopback ports free now (an FTPS passive range), from a random base."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return range(base, base + count)
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free port range")


def at(text: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM[:SS]'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def write_delivery(
    path: Path,
    lines: Sequence[str],
    delivered: datetime | None = None,
    *,
    newline: str = "\n",
    final_newline: bool = True,
) -> Path:
    """Write a delivered file and set its modification time, as the servers will on completion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(body.encode("utf-8"))
    if delivered is not None:
        stamp = delivered.timestamp()
        os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "meterdrop.duckdb") as s:
        yield s


@pytest.fixture
def ingest(store: Store) -> Callable[[Path], Outcome]:
    ingester = Ingester(store)
    return ingester.ingest


def mount_tmpfs(target: Path, size: int) -> bool:
    """A small file system of its own at ``target`` (the tests run as root here); False if refused."""
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.returncode == 0
