"""The SFTP drop server against real clients: OpenSSH ``sftp``, asyncssh, paramiko and a
hand-written SFTP client for the protocol corners the others never produce.

The server runs on 127.0.0.1 (port 0) in its own event loop thread, so blocking clients
(subprocesses, paramiko) and asyncssh clients (``asyncio.run`` in the test thread) talk
to it exactly as remote clients would.  Waiting for the server's side of a disconnect is
done by polling a condition with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import paramiko
import pytest
import uvloop

from fileserver.guard import Guard, GuardPolicy
from fileserver.sftp import MAX_OPEN_UPLOADS, start_sftp_server, stop_sftp_server
from fileserver.users import UserStore
from tests.conftest import eventually

from .conftest import VENDOR, VENDOR_PASSWORD

T = TypeVar("T")
LOCAL = "127.0.0.1"
OLD = 946_684_800.0  # 2000-01-01: a client-side mtime that must never become the delivery time


# -- harness ----------------------------------------------------------------------------
class SFTPServerThread:
    """A meterdrop SFTP server on its own event loop thread, as `meterdrop serve` runs it."""

    def __init__(self, users: UserStore, guard: Guard, certs_dir: Path, **options: Any) -> None:
        self.published: list[Path] = []
        self.loop = uvloop.new_event_loop()  # the loop `meterdrop serve` runs
        self.thread = threading.Thread(target=self.loop.run_forever, name="sftp-server", daemon=True)
        self.thread.start()
        self.acceptor = self.call(
            start_sftp_server(
                host=LOCAL,
                port=0,
                users=users,
                guard=guard,
                certs_dir=certs_dir,
                on_published=self.published.append,
                **options,
            )
        )
        self.port: int = self.acceptor.sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(stop_sftp_server(self.acceptor))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def host_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certs folder for the session: host keys are generated once, as in production."""
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def serve(users: UserStore, guard: Guard, host_certs: Path) -> Iterator[Callable[..., SFTPServerThread]]:
    started: list[SFTPServerThread] = []

    def start(**options: Any) -> SFTPServerThread:
        options.setdefault("guard", guard)
        options.setdefault("certs_dir", host_certs)
        server = SFTPServerThread(users, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".part-" in p.name]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def connect(port: int, **options: Any) -> Any:
    """An asyncssh client connection that ignores the local user's SSH configuration."""
    settings: dict[str, Any] = {
        "username": VENDOR,
        "password": VENDOR_PASSWORD,
        "known_hosts": None,
        "client_keys": None,
        "agent_path": None,
        "config": None,
        "connect_timeout": 20,
    }
    settings.update(options)
    return asyncssh.connect(LOCAL, port, **settings)


def replace_user(users: UserStore, name: str, password: str | None, keys: list[str]) -> None:
    """(Re)create a user with these credentials (UserStore has no 'add key')."""
    if users.get(name) is not None:
        users.remove(name)
    users.add(name, password, keys=keys)


def keygen(path: Path, *args: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-f", str(path), *args], check=True, capture_output=True)
    return path


def openssh_sftp(port: int, key: Path, commands: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    batch = tmp_path / f"batch-{time.monotonic_ns()}"
    batch.write_text(commands)
    return subprocess.run(
        [
            "/usr/bin/sftp",
            "-F", "/dev/null",
            "-oBatchMode=yes",
            "-oStrictHostKeyChecking=no",
            "-oUserKnownHostsFile=/dev/null",
            "-oIdentitiesOnly=yes",
            "-oIdentityAgent=none",
            "-oLogLevel=ERROR",
            "-i", str(key),
            "-P", str(port),
            "-b", str(batch),
            f"{VENDOR}@{LOCAL}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def csv_bytes(rows: int, tag: str = "") -> bytes:
    lines = ["device_id,measurement_time,energy_wh"]
    lines += [f"dev-{i % 7}{tag},2024-01-01 00:{i % 60:02d},{i * 1.5}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


# -- a minimal SFTP v3 client, for what real clients never do ---------------------------
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_WRITE = 1, 2, 3, 4, 6
FXP_EXTENDED, FXP_STATUS, FXP_HANDLE = 200, 101, 102


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _str(value: bytes) -> bytes:
    return _u32(len(value)) + value


class RawSFTP:
    """Speaks SFTP v3 over an asyncssh session channel, one request at a time."""

    def __init__(self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]) -> None:
        self.writer, self.reader, self.next_id = writer, reader, 0

    async def _packet(self) -> tuple[int, bytes]:
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        body = await self.reader.readexactly(length)
        return body[0], body[1:]

    async def start(self) -> None:
        self.writer.write(_u32(5) + bytes([FXP_INIT]) + _u32(3))
        kind, _ = await self._packet()
        assert kind == FXP_VERSION

    async def request(self, kind: int, *fields: bytes) -> tuple[int, bytes]:
        self.next_id += 1
        body = bytes([kind]) + _u32(self.next_id) + b"".join(fields)
        self.writer.write(_u32(len(body)) + body)
        reply, payload = await self._packet()
        assert int.from_bytes(payload[:4], "big") == self.next_id
        return reply, payload[4:]

    async def status(self, kind: int, *fields: bytes) -> int:
        reply, payload = await self.request(kind, *fields)
        assert reply == FXP_STATUS
        return int.from_bytes(payload[:4], "big")

    async def open_for_write(self, path: bytes) -> bytes:
        flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
        reply, payload = await self.request(FXP_OPEN, _str(path), _u32(flags), _u32(0))
        assert reply == FXP_HANDLE, payload
        return payload[4 : 4 + int.from_bytes(payload[:4], "big")]

    async def write(self, handle: bytes, offset: int, data: bytes) -> int:
        return await self.status(FXP_WRITE, _str(handle), offset.to_bytes(8, "big"), _str(data))


# -- tests: real clients deliver --------------------------------------------------------
def test_openssh_sftp_with_key_auth_uploads_into_a_new_folder(
    tmp_path: Path, users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    key = keygen(tmp_path / "id_ed25519", "-t", "ed25519")
    replace_user(users, VENDOR, VENDOR_PASSWORD, [key.with_name("id_ed25519.pub").read_text()])
    server = serve()
    local = tmp_path / "readings.csv"
    local.write_bytes(csv_bytes(20_000))  # several hundred KB: many pipelined writes
    os.utime(local, (OLD, OLD))

    before = time.time()
    result = openssh_sftp(
        server.port, key, f"mkdir exports\nput {local} exports/readings.csv\nls -l exports\n", tmp_path
    )
    after = time.time()

    assert result.returncode == 0, result.stderr
    folder = users.home(VENDOR) / "exports"
    final = folder / "readings.csv"
    assert final.read_bytes() == local.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["readings.csv"]  # no partial left
    assert before - 1 <= final.stat().st_mtime <= after + 1  # delivery time, not the client's mtime
    assert server.published == [final]
    assert "readings.csv" in result.stdout


def test_openssh_upload_then_rename_and_refused_operations(
    tmp_path: Path, users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    key = keygen(tmp_path / "id_ed25519", "-t", "ed25519")
    replace_user(users, VENDOR, None, [key.with_name("id_ed25519.pub").read_text()])
    server = serve()
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_bytes(csv_bytes(10, "a"))
    second.write_bytes(csv_bytes(10, "b"))

    # The "upload as x.tmp, rename to x.csv" pattern; OpenSSH renames with posix-rename,
    # which may replace the earlier delivery of the same name.
    script = (
        f"mkdir out\nput {first} out/day.tmp\nrename out/day.tmp out/day.csv\n"
        f"put {second} out/day.tmp\nrename out/day.tmp out/day.csv\n"
    )
    result = openssh_sftp(server.port, key, script, tmp_path)
    assert result.returncode == 0, result.stderr
    out = users.home(VENDOR) / "out"
    assert sorted(p.name for p in out.iterdir()) == ["day.csv"]
    assert (out / "day.csv").read_bytes() == second.read_bytes()
    assert server.published == [out / "day.tmp", out / "day.csv", out / "day.tmp", out / "day.csv"]

    # A leading '-' lets the batch go on after a failure, so every refusal is reported.
    refused = openssh_sftp(
        server.port,
        key,
        "-rm out/day.csv\n-rmdir out\n-chmod 777 out/day.csv\n-ln -s /etc/passwd out/pw\n"
        "-ln out/day.csv out/hard.csv\n-put -p {} out/kept-mtime.csv\n-get ../../etc/passwd {}\n".format(
            first, tmp_path / "stolen"
        ),
        tmp_path,
    )
    assert refused.stderr.count("Permission denied") == 5, refused.stderr
    assert "not support hardlink" in refused.stderr and "not found" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["day.csv", "kept-mtime.csv"]
    assert (out / "day.csv").read_bytes() == second.read_bytes()
    assert stat.S_IMODE((out / "day.csv").stat().st_mode) != 0o777
    # put -p: the data arrived and was published, but the client's mtime was refused.
    assert (out / "kept-mtime.csv").stat().st_mtime > OLD + 1
    assert not (tmp_path / "stolen").exists()


def test_asyncssh_client_password_upload_download_and_rename(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()
    home = users.home(VENDOR)
    v1, v2 = csv_bytes(100, "v1"), csv_bytes(120, "v2")

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.realpath(".") == "/"
            await sftp.mkdir("inbox")
            async with sftp.open("inbox/meters.csv", "wb") as upload:
                await upload.write(v1)
            async with sftp.open("inbox/meters.csv", "rb") as download:
                assert await download.read() == v1

            # Overwriting: the earlier delivery stays visible until the new upload completes.
            upload = await sftp.open("inbox/meters.csv", "wb")
            await upload.write(v2)
            assert (home / "inbox" / "meters.csv").read_bytes() == v1
            assert await sftp.listdir("inbox") == [".", "..", "meters.csv"]  # partials are hidden
            await upload.close()
            assert (home / "inbox" / "meters.csv").read_bytes() == v2

            # Opens that keep the content work on a copy, published on close.
            async with sftp.open("inbox/meters.csv", "ab") as appending:
                await appending.write(b"tail\n")
            assert (home / "inbox" / "meters.csv").read_bytes() == v2 + b"tail\n"
            with pytest.raises(asyncssh.SFTPFailure):  # FXF_EXCL on an existing name (v3: FX_FAILURE)
                await sftp.open("inbox/meters.csv", "xb")

            # Classic RENAME never replaces; posix-rename replaces a file.
            async with sftp.open("inbox/other.csv", "wb") as upload:
                await upload.write(v1)
            with pytest.raises(asyncssh.SFTPFailure):
                await sftp.rename("inbox/other.csv", "inbox/meters.csv")
            await sftp.rename("inbox/other.csv", "inbox/renamed.csv")
            await sftp.posix_rename("inbox/renamed.csv", "inbox/meters.csv")
            assert sorted(await sftp.listdir("inbox")) == [".", "..", "meters.csv"]
            await sftp.rename("inbox", "archive")

    run(session())
    assert (home / "archive" / "meters.csv").read_bytes() == v1
    assert partials(home) == []
    assert server.published[-1] == home / "archive" / "meters.csv"


def test_replacing_a_delivery_lets_it_be_kept_first(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    """An upload or posix-rename onto an existing name: ``on_replacing`` sees the earlier delivery first."""
    kept: list[tuple[Path, bytes]] = []
    server = serve(on_replacing=lambda path: kept.append((path, path.read_bytes())))
    report = users.home(VENDOR) / "report.csv"

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            for body in (b"first\n", b"second\n"):
                async with sftp.open("report.csv", "wb") as upload:
                    await upload.write(body)
            async with sftp.open("other.csv", "wb") as upload:
                await upload.write(b"third\n")
            await sftp.posix_rename("other.csv", "report.csv")

    run(session())
    assert kept == [(report, b"first\n"), (report, b"second\n")]
    assert report.read_bytes() == b"third\n"


def test_opens_that_keep_the_content_copy_nothing_until_a_write(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    """Each such open once copied the whole file at once: opened eight times, a delivery filled the disk eightfold."""
    server = serve()
    home = users.home(VENDOR)
    body = csv_bytes(2000, "big")

    def used() -> int:
        return sum(p.stat().st_size for p in home.rglob("*") if p.is_file())

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("big.csv", "wb") as upload:
                await upload.write(body)
            before, stamp = used(), (home / "big.csv").stat().st_mtime_ns
            handles = [await sftp.open("big.csv", "r+b") for _ in range(8)]
            assert used() == before  # nothing copied yet
            for handle in handles:
                await handle.close()
            assert used() == before and (home / "big.csv").stat().st_mtime_ns == stamp  # not published again
            async with sftp.open("big.csv", "r+b") as change:  # a write: the copy, then the change
                assert await change.read(5) == body[:5]
                await change.write(b"CHANGED", 0)
            with pytest.raises(asyncssh.SFTPFailure, match="open for writing at once"):
                [await sftp.open(f"many-{i}.csv", "wb") for i in range(MAX_OPEN_UPLOADS + 1)]

    run(session())
    assert (home / "big.csv").read_bytes() == b"CHANGED" + body[7:]
    assert len(server.published) == 2


def test_a_changed_or_removed_account_ends_what_its_open_session_may_do(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    """`meterdrop users passwd` and `remove` revoke a leaked credential: open sessions too, not only new logins."""
    server = serve()
    home = users.home(VENDOR)

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("before.csv", "wb") as upload:
                await upload.write(b"delivered before\n")
            during = await sftp.open("during.csv", "wb")
            await during.write(b"half an upload\n")
            users.set_password(VENDOR, "a new long passphrase")
            with pytest.raises(asyncssh.SFTPFailure, match="account was removed or changed"):
                await during.close()  # an upload the old password let in is not published
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="account was removed or changed"):
                await sftp.open("after.csv", "wb")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.mkdir("folder")

    run(session())
    assert sorted(p.name for p in home.iterdir()) == ["before.csv"]
    assert server.published == [home / "before.csv"]


def test_names_up_to_the_file_system_limit_upload(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    """The hidden partial name adds 15 bytes: names of 241-255 bytes once failed with no reason."""
    server = serve()
    name = "m" * 251 + ".csv"  # 255 bytes, the most one name may have

    async def session() -> None:
        async with (
            connect(server.port) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open(name, "wb") as upload,
        ):
            await upload.write(csv_bytes(10, "long"))

    run(session())
    assert (users.home(VENDOR) / name).read_bytes() == csv_bytes(10, "long")
    assert partials(users.home(VENDOR)) == []


def test_paramiko_client_password_upload(users: UserStore, serve: Callable[..., SFTPServerThread]) -> None:
    server = serve()
    data = csv_bytes(5_000)
    with paramiko.Transport((LOCAL, server.port)) as transport:
        transport.connect(username=VENDOR, password=VENDOR_PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.mkdir("paramiko")
        attrs = sftp.putfo(io.BytesIO(data), "paramiko/export.csv")  # stats the result itself
        assert attrs.st_size == len(data)
        assert sftp.listdir("paramiko") == ["export.csv"]
        with sftp.open("paramiko/export.csv", "rb") as download:
            assert download.read() == data
        sftp.close()
    final = users.home(VENDOR) / "paramiko" / "export.csv"
    assert final.read_bytes() == data
    assert server.published == [final]


def test_pem_public_key_from_a_panel_server_authenticates(
    tmp_path: Path, users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    key = keygen(tmp_path / "panel_rsa", "-t", "rsa", "-b", "3072")
    pem = subprocess.run(
        ["ssh-keygen", "-e", "-m", "PKCS8", "-f", str(key.with_name("panel_rsa.pub"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    users.add("panel", keys=[pem])
    server = serve()

    async def upload() -> None:
        options = {"username": "panel", "password": None, "client_keys": [str(key)]}
        async with (
            connect(server.port, **options) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("panel.csv", "wb") as out,
        ):
            await out.write(b"a,b\n1,2\n")

    run(upload())
    assert (users.home("panel") / "panel.csv").read_bytes() == b"a,b\n1,2\n"

    # The same key through paramiko, as an embedded client would (rsa-sha2 signatures) ...
    pkey = paramiko.RSAKey.from_private_key_file(str(key))
    with paramiko.Transport((LOCAL, server.port)) as transport:
        transport.connect(username="panel", pkey=pkey)
        assert transport.is_authenticated()

    # ... but never with SHA-1 "ssh-rsa" signatures (paramiko 5 no longer sends them).
    async def sha1_login() -> None:
        options = {
            "username": "panel",
            "password": None,
            "client_keys": [str(key)],
            "signature_algs": ["ssh-rsa"],
        }
        async with connect(server.port, **options):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        run(sha1_login())


# -- tests: only complete uploads become visible ----------------------------------------
def test_upload_cut_off_by_a_dropped_connection_leaves_nothing(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()
    home = users.home(VENDOR)
    complete = csv_bytes(50, "complete")

    async def deliver_then_get_cut_off() -> None:
        async with (
            connect(server.port) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("meters.csv", "wb") as upload,
        ):
            await upload.write(complete)
        conn = await connect(server.port)
        sftp = await conn.start_sftp_client()
        upload = await sftp.open("meters.csv", "wb")
        await upload.write(csv_bytes(5_000, "cut"))  # acknowledged: it is on the server's disk
        assert len(partials(home)) == 1
        conn.abort()  # no SSH_FXP_CLOSE, no channel close, no disconnect message

    run(deliver_then_get_cut_off())
    # asyncssh now "closes" the handle during its cleanup: that close must not publish.
    eventually(lambda: not partials(home), "the server to discard the partial upload")
    assert (home / "meters.csv").read_bytes() == complete  # the earlier delivery is untouched
    assert server.published == [home / "meters.csv"]


def test_paramiko_socket_closed_mid_upload_leaves_nothing(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()
    home = users.home(VENDOR)
    sock = socket.create_connection((LOCAL, server.port))
    transport = paramiko.Transport(sock)
    try:
        transport.connect(username=VENDOR, password=VENDOR_PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        upload = sftp.open("paramiko-cut.csv", "wb")
        upload.write(csv_bytes(3_000))
        upload.flush()
        eventually(lambda: bool(partials(home)), "the partial upload to appear")
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    finally:
        transport.close()
    eventually(lambda: not partials(home), "the server to discard the partial upload")
    assert not (home / "paramiko-cut.csv").exists()
    assert server.published == []


def test_channel_eof_with_a_handle_open_is_not_a_close(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    """The session ends cleanly (channel EOF, connection alive) but the client never sent
    SSH_FXP_CLOSE: asyncssh still calls close() for the handle; nothing may be published."""
    server = serve()
    home = users.home(VENDOR)

    async def session() -> None:
        async with connect(server.port) as conn:
            writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
            raw = RawSFTP(writer, reader)
            await raw.start()
            # First the good path through the same client: open, write, close -> published.
            handle = await raw.open_for_write(b"closed.csv")
            assert await raw.write(handle, 0, b"x,y\n1,2\n") == asyncssh.FX_OK
            assert await raw.status(FXP_CLOSE, _str(handle)) == asyncssh.FX_OK
            # Extensions this server does not offer are refused as unsupported.
            hardlink = await raw.status(
                FXP_EXTENDED, _str(b"hardlink@openssh.com"), _str(b"closed.csv"), _str(b"h")
            )
            assert hardlink == asyncssh.FX_OP_UNSUPPORTED
            assert await raw.status(FXP_OPEN, _str(b"nul\x00.csv"), _u32(asyncssh.FXF_WRITE), _u32(0)) == (
                asyncssh.FX_PERMISSION_DENIED
            )
            # Then an upload left open when the client ends the channel.
            handle = await raw.open_for_write(b"eof.csv")
            assert await raw.write(handle, 0, b"x,y\n3,") == asyncssh.FX_OK
            writer.write_eof()
            assert await reader.read() == b""  # the server ended the session: cleanup has run

    run(session())
    assert (home / "closed.csv").read_bytes() == b"x,y\n1,2\n"
    assert not (home / "eof.csv").exists()
    assert partials(home) == []
    assert not (home / "h").exists()
    assert server.published == [home / "closed.csv"]


def test_uploads_over_the_size_limit_are_refused_and_discarded(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve(max_upload_bytes=1_000)
    home = users.home(VENDOR)

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            upload = await sftp.open("big.csv", "wb")
            await upload.write(b"x" * 600)
            with pytest.raises(asyncssh.SFTPFailure):  # v3 has no quota code
                await upload.write(b"y" * 600, 600)
            assert partials(home) == []  # discarded at once, not at close
            with pytest.raises(asyncssh.SFTPFailure):
                await upload.write(b"z", 0)  # and it stays refused
            with pytest.raises(asyncssh.SFTPFailure, match="not stored: upload refused"):
                await upload.close()  # the close says so too: nothing was stored
            async with sftp.open("small.csv", "wb") as ok:
                await ok.write(b"s" * 1_000)

    run(session())
    assert not (home / "big.csv").exists()
    assert (home / "small.csv").stat().st_size == 1_000
    assert server.published == [home / "small.csv"]


def test_stopping_the_server_disconnects_and_discards_open_uploads(
    users: UserStore, guard: Guard, host_certs: Path
) -> None:
    server = SFTPServerThread(users, guard, host_certs)
    home = users.home(VENDOR)

    async def session() -> None:
        conn = await connect(server.port)
        sftp = await conn.start_sftp_client()
        upload = await sftp.open("late.csv", "wb")
        await upload.write(b"device_id,energy_wh\n")
        assert len(partials(home)) == 1
        await asyncio.to_thread(server.stop)  # what `meterdrop serve` does on SIGTERM
        assert partials(home) == []  # discarded before stop_sftp_server returned
        await conn.wait_closed()
        with pytest.raises(OSError):
            await connect(server.port)

    run(session())
    assert not (home / "late.csv").exists()
    assert server.published == []


# -- tests: confinement ------------------------------------------------------------------
def test_no_path_leaves_the_users_folder(
    tmp_path: Path, users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()
    home = users.home(VENDOR)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("not yours")
    os.symlink(outside, home / "escape")  # planted by someone with shell access
    os.symlink(secret, home / "secret-link")
    users.add("other", "other-pass")
    (users.home("other") / "theirs.csv").write_text("other user's data")
    (home / "mine.csv").write_text("a,b\n")

    async def attacks() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            leaks = [
                "../outside/secret.txt",
                "../../outside/secret.txt",
                "/../../../outside/secret.txt",
                str(secret),
                "%2e%2e/%2e%2e/outside/secret.txt",
                "..\\..\\outside\\secret.txt",
                "../other/theirs.csv",
                "../../drop/other/theirs.csv",
                str(users.home("other") / "theirs.csv"),
            ]
            for path in leaks:
                with pytest.raises(asyncssh.SFTPError):
                    await sftp.open(path, "rb")
            for path in ["escape/secret.txt", "secret-link", "escape", "escape/new.csv"]:
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.open(path, "rb")
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await sftp.open(path, "wb")
            for call in (
                sftp.listdir("escape"),
                sftp.stat("secret-link"),
                sftp.lstat("escape"),
                sftp.readlink("secret-link"),
                sftp.realpath("escape/secret.txt"),
                sftp.rename("secret-link", "copy.txt"),
                sftp.rename("mine.csv", "escape/mine.csv"),
                sftp.open("bad\x00name.csv", "wb"),
                sftp.open(".hidden.csv", "wb"),
                sftp.open(".mine.csv.part-0000", "wb"),
                sftp.mkdir(".git"),
            ):
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await call
            # '..' stops at the user's root, like a chroot; realpath speaks the user's view.
            assert await sftp.realpath("/../..") == "/"
            assert await sftp.realpath("a/../../b") == "/b"
            assert await sftp.listdir("..") == await sftp.listdir("/") == [".", "..", "mine.csv"]
            # A literal "%2e%2e" is just a name, inside the folder.
            async with sftp.open("%2e%2e", "wb") as odd:
                await odd.write(b"ok")
            async with sftp.open("../../written-up.csv", "wb") as up:
                await up.write(b"ok")

    run(attacks())
    assert (home / "%2e%2e").read_bytes() == b"ok"
    assert (home / "written-up.csv").read_bytes() == b"ok"  # '..' collapsed at the root
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert not (tmp_path / "written-up.csv").exists()
    assert not (users.drop_root / "written-up.csv").exists()
    assert (home / "mine.csv").exists() and not (home / "copy.txt").exists()


def test_delete_chmod_and_links_are_refused(users: UserStore, serve: Callable[..., SFTPServerThread]) -> None:
    server = serve()
    home = users.home(VENDOR)

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            await sftp.mkdir("keep")
            async with sftp.open("keep/data.csv", "wb") as upload:
                await upload.write(b"a\n")
                with pytest.raises(asyncssh.SFTPPermissionDenied):  # fsetstat on the open handle
                    await upload.utime((OLD, OLD))
            for call in (
                sftp.remove("keep/data.csv"),
                sftp.rmdir("keep"),
                sftp.chmod("keep/data.csv", 0o777),
                sftp.utime("keep/data.csv", (OLD, OLD)),
                sftp.symlink("/etc/passwd", "keep/passwd"),
                sftp.symlink("data.csv", "keep/alias.csv"),
            ):
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await call
            with pytest.raises(asyncssh.SFTPError):  # hardlink@openssh.com is not offered
                await sftp.link("keep/data.csv", "keep/hard.csv")

    run(session())
    data = home / "keep" / "data.csv"
    assert sorted(p.name for p in data.parent.iterdir()) == ["data.csv"]
    assert data.read_bytes() == b"a\n"
    assert data.stat().st_mtime > OLD + 1
    assert stat.S_IMODE(data.stat().st_mode) != 0o777


def test_names_with_line_breaks_are_refused(users: UserStore, serve: Callable[..., SFTPServerThread]) -> None:
    """Such a name would write lines of the uploader's choosing into the server's log."""
    server = serve()
    home = users.home(VENDOR)

    async def session() -> None:
        async with connect(server.port) as conn, conn.start_sftp_client() as sftp:
            for name in (
                "x.csv\n2026-12-05 12:00:00,000 INFO meterdrop: forged.csv",
                "a\rb.csv",
                "tab\there",
            ):
                with pytest.raises(asyncssh.SFTPPermissionDenied, match="control character"):
                    async with sftp.open(name, "wb") as upload:
                        await upload.write(b"a\n")
                with pytest.raises(asyncssh.SFTPPermissionDenied, match="control character"):
                    await sftp.mkdir(name)
            async with sftp.open("fine.csv", "wb") as upload:
                await upload.write(b"a\n")
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="control character"):
                await sftp.rename("fine.csv", "fine\n.csv")

    run(session())
    assert sorted(p.name for p in home.iterdir()) == ["fine.csv"]


# -- tests: the SSH side ---------------------------------------------------------------
def test_repeated_wrong_passwords_ban_the_address(
    users: UserStore, guard: Guard, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()

    async def login(password: str) -> None:
        async with connect(server.port, password=password) as conn:
            await conn.run("true", check=False)

    for _ in range(guard.policy.max_failures):
        with pytest.raises(asyncssh.DisconnectError):  # PermissionDenied, or the ban's disconnect
            run(login("wrong"))
    assert guard.is_banned(LOCAL)
    with pytest.raises((asyncssh.Error, OSError)):  # refused before the SSH handshake
        run(login(VENDOR_PASSWORD))


def test_a_wrong_password_is_answered_late(users: UserStore, serve: Callable[..., SFTPServerThread]) -> None:
    slow = Guard(GuardPolicy(max_failures=100, delay_per_failure=0.3, max_delay=0.3))
    server = serve(guard=slow)

    async def login(password: str) -> float:
        started = time.monotonic()
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(server.port, password=password):
                pass
        return time.monotonic() - started

    assert run(login("wrong")) >= 0.3
    assert not slow.is_banned(LOCAL)


def test_sftp_only_no_shell_exec_scp_or_forwarding(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()

    async def session() -> None:
        async with connect(server.port) as conn:
            for command in ("ls", "scp -t .", "internal-sftp"):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.run(command)
            with pytest.raises(asyncssh.ChannelOpenError):  # interactive shell
                await conn.create_session(asyncssh.SSHClientSession)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, subsystem="netconf")
            with pytest.raises(asyncssh.ChannelOpenError):  # sftp, but with a terminal
                await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp", term_type="xterm")
            with pytest.raises(asyncssh.ChannelOpenError):  # local (direct-tcpip) forwarding
                await conn.create_connection(asyncssh.SSHTCPSession, LOCAL, server.port)
            with pytest.raises(asyncssh.ChannelListenError):  # remote forwarding
                await conn.forward_remote_port(LOCAL, 0, LOCAL, server.port)
            async with conn.start_sftp_client() as sftp:  # the connection is still good for SFTP
                assert await sftp.listdir("/") == [".", ".."]

    run(session())


def server_kexinit(port: int) -> dict[str, list[str]]:
    """The algorithm lists of the server's first (plain-text) SSH_MSG_KEXINIT."""
    fields = ["kex", "host_key", "enc_cs", "enc_sc", "mac_cs", "mac_sc", "comp_cs", "comp_sc"]
    with socket.create_connection((LOCAL, port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"SSH-2.0-meterdrop_test\r\n")
        while not stream.readline().startswith(b"SSH-2.0-"):
            pass
        length = int.from_bytes(stream.read(4), "big")
        packet = stream.read(length)
    payload = packet[1 : length - packet[0]]
    assert payload[0] == 20  # SSH_MSG_KEXINIT
    lists, pos = {}, 17
    for name in fields:
        size = int.from_bytes(payload[pos : pos + 4], "big")
        lists[name] = payload[pos + 4 : pos + 4 + size].decode().split(",")
        pos += 4 + size
    return lists


def test_strict_kex_and_only_modern_algorithms(
    users: UserStore, serve: Callable[..., SFTPServerThread]
) -> None:
    server = serve()
    offered = server_kexinit(server.port)
    assert "kex-strict-s-v00@openssh.com" in offered["kex"]  # Terrapin (CVE-2023-48795)
    assert not [alg for alg in offered["kex"] if "sha1" in alg or alg.startswith(("gss-", "rsa1024"))]
    assert sorted(offered["host_key"]) == ["rsa-sha2-256", "rsa-sha2-512", "ssh-ed25519"]
    for ciphers in (offered["enc_cs"], offered["enc_sc"]):
        assert ciphers and not [c for c in ciphers if c.endswith("-cbc") or "3des" in c or "arcfour" in c]
    for macs in (offered["mac_cs"], offered["mac_sc"]):
        assert macs and not [m for m in macs if "sha1" in m or "md5" in m or "umac-64" in m]

    weak_offers: list[dict[str, Any]] = [
        {"kex_algs": ["diffie-hellman-group1-sha1"]},
        {"kex_algs": ["diffie-hellman-group14-sha1"]},
        {"encryption_algs": ["aes128-cbc"]},
        {"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha1"]},
        {"server_host_key_algs": ["ssh-rsa"]},
    ]
    for weak in weak_offers:

        async def attempt(options: dict[str, Any] = weak) -> None:
            async with connect(server.port, **options):
                pass

        with pytest.raises(asyncssh.Error):
            run(attempt())


def test_host_keys_are_generated_once_and_reused(tmp_path: Path, users: UserStore, guard: Guard) -> None:
    certs = tmp_path / "certs"

    async def host_key(port: int, algorithm: str) -> bytes:
        async with connect(port, server_host_key_algs=[algorithm]) as conn:
            key = conn.get_server_host_key()
            assert key is not None
            return bytes(key.public_data)

    def presented() -> dict[str, bytes]:
        server = SFTPServerThread(users, guard, certs)
        try:
            return {alg: run(host_key(server.port, alg)) for alg in ("ssh-ed25519", "rsa-sha2-256")}
        finally:
            server.stop()

    first = presented()
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600
    stored = {
        "ssh-ed25519": asyncssh.read_private_key(certs / "ssh_host_ed25519_key").public_data,
        "rsa-sha2-256": asyncssh.read_private_key(certs / "ssh_host_rsa_key").public_data,
    }
    assert first == stored
    assert asyncssh.read_private_key(certs / "ssh_host_rsa_key").pyca_key.key_size == 3072
    assert presented() == first  # a restart keeps clients' known_hosts valid
