"""Fixtures shared by the fileserver tests (SFTP and FTPS): one user, one fast guard.

Kept generic on purpose: protocol-specific fixtures live in each protocol's test file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fileserver.guard import Guard, GuardPolicy
from fileserver.users import UserStore

VENDOR = "vendor"
VENDOR_PASSWORD = "s3cret-pass"


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    """A UserStore under ``tmp_path / "data"`` with the password user vendor/s3cret-pass."""
    store = UserStore(tmp_path / "data")
    store.add(VENDOR, VENDOR_PASSWORD)
    return store


@pytest.fixture
def guard() -> Guard:
    """The production policy's shape (5 failures -> ban) with delays short enough for tests."""
    return Guard(
        GuardPolicy(max_failures=5, window=60.0, ban_seconds=60.0, delay_per_failure=0.01, max_delay=0.05)
    )


@pytest.fixture(scope="session")
def drop_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSH host keys and the TLS certificate for tests running both servers: made once, reused."""
    return tmp_path_factory.mktemp("drop-certs")


@pytest.fixture
def box(users: UserStore, guard: Guard, drop_certs: Path) -> Iterator[Any]:
    """Both servers on one user store and one ban list, as `meterdrop serve` runs them
    (``attack_harness.DropBox``); a test module may override ``users`` or ``guard``."""
    from .attack_harness import DropBox  # it imports this module: not at the top

    running = DropBox.start(users, guard, drop_certs)
    yield running
    running.stop()
