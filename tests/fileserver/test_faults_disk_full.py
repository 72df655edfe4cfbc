"""The disk filling up during an upload, on both protocols.

The data dir is a small tmpfs mounted for the test (the tests run as root here); where
mounting is not allowed, the same limit is injected where the servers write upload bytes
(:func:`fileserver.drops.write_all`), and the ``injected`` variant runs that emulation
everywhere so it cannot rot.  What must hold, per protocol and client:

* the client gets a clear error: SFTP a failure status saying "No space left on device"
  (on the write and again on the close), FTPS a ``452`` reply, read after the client sent
  its data, not a connection reset;
* the log says so (an error line with the user, path and reason);
* nothing half-written remains: neither the hidden partial nor the final name, and the
  space the partial took is free again at once;
* the service keeps working: a small upload fits while the disk is nearly full, and once
  space is freed (a filler file deleted) the same upload succeeds, on the same session.
"""

from __future__ import annotations

import errno
import ftplib
import io
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from fileserver import drops
from fileserver.users import UserStore
from tests.conftest import mount_tmpfs

from .attack_harness import LOCAL, DropBox, openssh_sftp_batch
from .conftest import VENDOR, VENDOR_PASSWORD
from .test_sftp import keygen, run

SIZE = 4 << 20  # the small disk
UPLOAD = 2 << 20  # bigger than what is left once the filler is in
LEFT = 1 << 20  # free space left by the filler


@dataclass
class SmallDisk:
    root: Path
    kind: str  # "tmpfs" or "injected"
    capacity: int

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())

    def free(self) -> int:
        if self.kind == "tmpfs":
            info = os.statvfs(self.root)
            return info.f_bavail * info.f_frsize
        return self.capacity - self.used()

    def fill(self, leave: int) -> Path:
        """Take all but ``leave`` bytes with a filler file outside the users' folders."""
        filler = self.root / "filler.bin"
        with filler.open("wb") as out:
            out.write(b"\0" * max(self.free() - leave, 0))
        return filler


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SmallDisk]:
    root = tmp_path / "data"
    root.mkdir()
    if request.param == "tmpfs" and mount_tmpfs(root, SIZE):
        try:
            yield SmallDisk(root, "tmpfs", SIZE)
        finally:
            subprocess.run(["umount", str(root)], check=True)
        return
    if request.param == "tmpfs":
        print("cannot mount a tmpfs here: injecting the limit instead")
    disk = SmallDisk(root, "injected", SIZE)
    real_write = drops.write_all

    def limited(fd: int, data: bytes, offset: int | None = None) -> None:
        """As a full file system does: write what fits, then fail with ENOSPC."""
        room = disk.capacity - disk.used()
        if len(data) > room:
            if room > 0:
                real_write(fd, data[:room], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data, offset)

    monkeypatch.setattr(drops, "write_all", limited)
    yield disk


@pytest.fixture
def users(small_disk: SmallDisk) -> UserStore:
    """The user store on the small disk (overrides the shared fixture)."""
    store = UserStore(small_disk.root)
    store.add(VENDOR, VENDOR_PASSWORD)
    return store


def body(size: int) -> bytes:
    line = b"device-7,2024-01-01T00:00Z,12.5\n"
    return (line * (size // len(line) + 1))[:size]


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.rglob("*"))


def assert_logged(caplog: pytest.LogCaptureFixture, logger: str, *words: str) -> None:
    messages = [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.ERROR]
    assert any(all(word in m for word in words) for m in messages), messages


def test_sftp_upload_filling_the_disk(
    small_disk: SmallDisk, box: DropBox, users: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meterdrop")
    home = users.home(VENDOR)
    filler = small_disk.fill(leave=LEFT)
    free_before = small_disk.free()
    data = body(UPLOAD)
    free_after_failure = -1

    async def session() -> None:
        nonlocal free_after_failure
        async with box.sftp_connect() as conn, conn.start_sftp_client() as sftp:
            upload = await sftp.open("big.csv", "wb")
            with pytest.raises(asyncssh.SFTPError) as failed:
                await upload.write(data)
            assert "No space left on device" in str(failed.value.reason)
            # The partial went at the failed write, not at close, and its space with it.
            assert leftovers(home) == []
            free_after_failure = small_disk.free()
            with pytest.raises(
                asyncssh.SFTPFailure, match="not stored: write failed: No space left on device"
            ):
                await upload.close()
            # The server keeps working while the disk is nearly full ...
            async with sftp.open("small.csv", "wb") as small:
                await small.write(body(10_000))
            # ... and once space returns, the same upload goes through on the same session.
            filler.unlink()
            async with sftp.open("big.csv", "wb") as retry:
                await retry.write(data)

    run(session())
    assert free_after_failure == free_before
    assert (home / "big.csv").read_bytes() == data
    assert (home / "small.csv").stat().st_size == 10_000
    assert leftovers(home) == ["big.csv", "small.csv"]
    assert box.sftp.published == [home / "small.csv", home / "big.csv"]
    assert_logged(caplog, "meterdrop.sftp", "user=vendor", "path=/big.csv", "No space left on device")
    print(f"{small_disk.kind}: {free_before} bytes free before the upload, {free_after_failure} after "
          f"the failed write; 0 bytes left in the folder")  # fmt: skip


def test_openssh_sftp_put_filling_the_disk(
    small_disk: SmallDisk, box: DropBox, users: UserStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("openssh-client")
    key = keygen(workdir / "id_ed25519", "-t", "ed25519")
    users.remove(VENDOR)
    users.add(VENDOR, VENDOR_PASSWORD, keys=[key.with_name("id_ed25519.pub").read_text()])
    home = users.home(VENDOR)
    (workdir / "big.csv").write_bytes(body(UPLOAD))
    filler = small_disk.fill(leave=LEFT)
    free_before = small_disk.free()

    failed = openssh_sftp_batch(box.sftp_port, key, "put big.csv big.csv\n", workdir)
    # SFTP v3 has no "disk full" status: OpenSSH shows the status (FX_FAILURE) on the write
    # and again on the close, and stops; the server's reason is in its log.
    assert failed.returncode != 0
    assert 'write remote "/big.csv": Failure' in failed.stderr, failed.stderr
    assert "close remote: Failure" in failed.stderr, failed.stderr
    assert leftovers(home) == []
    assert small_disk.free() == free_before  # the partial's space is free again
    filler.unlink()
    retried = openssh_sftp_batch(box.sftp_port, key, "put big.csv big.csv\n", workdir)
    assert retried.returncode == 0, retried.stderr
    assert (home / "big.csv").read_bytes() == (workdir / "big.csv").read_bytes()
    print(f"{small_disk.kind}: OpenSSH sftp said {failed.stderr.strip()!r}")


def _upload(ftp: ftplib.FTP_TLS, name: str, data: bytes) -> str:
    """STOR ``name``: send everything, end with TLS close_notify, return the final reply."""
    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd(f"STOR {name}")
    conn.sendall(data)  # the server drains a failed upload: no reset mid-way
    assert isinstance(conn, ssl.SSLSocket)
    conn.unwrap()
    conn.close()
    try:
        return ftp.voidresp()
    except ftplib.Error as error:
        return str(error)


def test_ftps_upload_filling_the_disk(
    small_disk: SmallDisk, box: DropBox, users: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meterdrop")
    home = users.home(VENDOR)
    filler = small_disk.fill(leave=LEFT)
    free_before = small_disk.free()
    data = body(UPLOAD)
    ftp = box.ftps_login()
    try:
        reply = _upload(ftp, "big.csv", data)
        assert reply.startswith("452 Insufficient storage space: No space left on device"), reply
        assert leftovers(home) == []
        assert small_disk.free() == free_before
        with pytest.raises(ftplib.error_temp, match=r"^452 .*No space left on device"):  # ftplib's own way
            ftp.storbinary("STOR big.csv", io.BytesIO(data))
        assert leftovers(home) == []
        assert _upload(ftp, "small.csv", body(10_000)).startswith("226")
        filler.unlink()
        assert _upload(ftp, "big.csv", data).startswith("226")
        ftp.quit()
    finally:
        ftp.close()
    assert (home / "big.csv").read_bytes() == data
    assert leftovers(home) == ["big.csv", "small.csv"]
    assert box.ftps_published == [home / "small.csv", home / "big.csv"]
    assert_logged(caplog, "meterdrop.ftps", "user=vendor", "path=/big.csv", "No space left on device")
    print(f"{small_disk.kind}: 452 after {len(data)} bytes sent; 0 bytes left on disk")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_upload_filling_the_disk(
    small_disk: SmallDisk, box: DropBox, users: UserStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client = tmp_path_factory.mktemp("curl-client")
    source = client / "big.csv"
    source.write_bytes(body(UPLOAD))
    home = users.home(VENDOR)
    filler = small_disk.fill(leave=LEFT)

    def curl() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(box.certs / "ftps.crt"),
             "--max-time", "60", "--user", f"{VENDOR}:{VENDOR_PASSWORD}", "-T", str(source),
             f"ftp://{LOCAL}:{box.ftps_port}/"],
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip

    failed = curl()
    assert failed.returncode != 0 and "452" in failed.stderr, failed.stderr
    assert leftovers(home) == []
    filler.unlink()
    retried = curl()
    assert retried.returncode == 0, retried.stderr
    assert (home / "big.csv").read_bytes() == source.read_bytes()
    print(f"{small_disk.kind}: curl said {failed.stderr.strip()!r}")
