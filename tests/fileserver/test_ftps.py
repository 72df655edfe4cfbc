"""The FTPS drop server against real clients: ``ftplib.FTP_TLS``, ``curl``, ``openssl s_client``
and raw sockets for what well-behaved clients never do.

The server runs on 127.0.0.1 (port 0) in its own thread with a passive range of free ports.
Clients verify the server's generated certificate (its SAN holds 127.0.0.1).  Waiting for
the server's side of something is done by reading the reply it sends, or by polling a
condition with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import contextlib
import datetime
import ftplib
import io
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fileserver.ftps import FtpsServer
from fileserver.guard import Guard, GuardPolicy
from fileserver.tlscert import CertificateError
from fileserver.users import UserStore
from tests.conftest import eventually, free_port_range

from .conftest import VENDOR, VENDOR_PASSWORD

LOCAL = "127.0.0.1"
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")


# -- harness ----------------------------------------------------------------------------


class Server:
    """A started FtpsServer plus what the tests look at."""

    def __init__(self, ftps: FtpsServer, passive: range, home: Path, certs: Path) -> None:
        self.ftps, self.passive, self.home, self.certs = ftps, passive, home, certs
        self.published: list[Path] = []

    @property
    def port(self) -> int:
        return self.ftps.address[1]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certificate for the session: generated once, reused, as in production."""
    return tmp_path_factory.mktemp("ftps-certs")


@pytest.fixture
def serve(users: UserStore, guard: Guard, certs: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(passive_count: int = 3, **options: Any) -> Server:
        passive = free_port_range(passive_count)
        options.setdefault("guard", guard)
        options.setdefault("certs_dir", certs)
        published: list[Path] = []
        ftps = FtpsServer(
            host=LOCAL, port=0, passive_ports=passive, users=users, on_published=published.append, **options
        )
        server = Server(ftps, passive, users.home(VENDOR), options["certs_dir"])
        server.published = published
        ftps.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.ftps.stop()


def client_context(certs: Path) -> ssl.SSLContext:
    """A client that verifies the server's certificate (and its 127.0.0.1 SAN)."""
    return ssl.create_default_context(cafile=str(certs / "ftps.crt"))


class Clients:
    """Opens ftplib clients and closes whatever a test left open."""

    def __init__(self) -> None:
        self.open: list[ftplib.FTP] = []

    def tls(self, server: Server, *, login: bool = True, password: str = VENDOR_PASSWORD,
            cls: type[ftplib.FTP_TLS] = ftplib.FTP_TLS) -> ftplib.FTP_TLS:  # fmt: skip
        ftp = cls(context=client_context(server.certs), timeout=20)
        self.open.append(ftp)
        ftp.connect(LOCAL, server.port)
        if login:
            ftp.login(VENDOR, password)
            ftp.prot_p()
        return ftp

    def plain(self, server: Server) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=20)
        self.open.append(ftp)
        ftp.connect(LOCAL, server.port)
        return ftp

    def close_all(self) -> None:
        for ftp in self.open:
            ftp.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close_all()


class SessionReusingFTP_TLS(ftplib.FTP_TLS):
    """What curl and most FTPS clients do, and ftplib does not: resume the control
    connection's TLS session on each data connection."""

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        assert isinstance(self.sock, ssl.SSLSocket)
        conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def hidden(folder: Path) -> list[str]:
    """Dot-names anywhere below ``folder``: partial uploads would show up here."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def payload(size: int) -> bytes:
    """Binary content with CR, LF, CRLF and NUL bytes in it, which TYPE A would mangle."""
    unit = b"device,2024-01-01T00:00Z,1.5\r\n\x00\xff\r\rtail\n"
    return (unit * (size // len(unit) + 1))[:size]


def finish_upload(ftp: ftplib.FTP_TLS, conn: socket.socket, data: bytes) -> str:
    """Send ``data`` on a data connection, close it properly, return the final reply.

    The server may close the connection first (limit exceeded, refusal): the reply on the
    control connection is what counts, so socket errors on the way are tolerated.
    """
    try:
        conn.sendall(data)
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()
    except OSError:
        pass
    finally:
        conn.close()
    try:
        return ftp.voidresp()
    except ftplib.all_errors as error:
        return str(error)


def listing(ftp: ftplib.FTP_TLS, command: str) -> list[str]:
    """NLST/MLSD in binary type: ftplib's nlst()/mlsd() send TYPE A, which the server refuses."""
    ftp.sendcmd("TYPE I")
    chunks: list[bytes] = []
    ftp.retrbinary(command, chunks.append)
    return [line for line in b"".join(chunks).decode().split("\r\n") if line]


def names(ftp: ftplib.FTP_TLS, folder: str = "") -> list[str]:
    return sorted(listing(ftp, f"NLST {folder}".strip()))


def stat_bytes_received(ftp: ftplib.FTP_TLS) -> int:
    for line in ftp.sendcmd("STAT").splitlines():
        if "Total bytes received:" in line:
            return int(line.rsplit(":", 1)[1])
    return 0


# -- uploads that must arrive -----------------------------------------------------------
def test_ftplib_upload_is_published_with_identical_bytes(
    serve: Callable[..., Server], clients: Clients
) -> None:
    server = serve()
    ftp = clients.tls(server)
    assert ftp.mkd("export") == "/export"
    body = payload(300_000) + os.urandom(50_000)
    before = time.time()
    reply = ftp.storbinary("STOR export/readings.csv", io.BytesIO(body))
    assert reply.startswith("226")
    final = server.home / "export" / "readings.csv"
    assert final.read_bytes() == body
    assert server.published == [final]
    assert before - 1 <= final.stat().st_mtime <= time.time() + 1  # stamped at completion
    assert hidden(server.home) == []
    assert names(ftp, "export") == ["readings.csv"]
    with pytest.raises(ftplib.error_perm, match=r"^504"):
        ftp.nlst("export")  # ftplib lists in TYPE A, which is refused

    downloaded = io.BytesIO()
    ftp.retrbinary("RETR export/readings.csv", downloaded.write)
    assert downloaded.getvalue() == body

    # The same name delivered again replaces the file atomically.
    ftp.storbinary("STOR export/readings.csv", io.BytesIO(b"second delivery\n"))
    assert final.read_bytes() == b"second delivery\n"
    assert server.published == [final, final]
    ftp.quit()


def test_replacing_a_delivery_lets_it_be_kept_first(serve: Callable[..., Server], clients: Clients) -> None:
    """STOR or RNTO onto an existing name: ``on_replacing`` sees the earlier delivery before it goes."""
    kept: list[tuple[Path, bytes]] = []
    server = serve(on_replacing=lambda path: kept.append((path, path.read_bytes())))
    ftp = clients.tls(server)
    report = server.home / "report.csv"
    ftp.storbinary("STOR report.csv", io.BytesIO(b"first\n"))
    assert kept == []  # nothing replaced
    ftp.storbinary("STOR report.csv", io.BytesIO(b"second\n"))
    ftp.storbinary("STOR other.csv", io.BytesIO(b"third\n"))
    ftp.rename("other.csv", "report.csv")
    assert kept == [(report, b"first\n"), (report, b"second\n")]
    assert report.read_bytes() == b"third\n"
    ftp.mkd("folder")
    ftp.mkd("empty")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.rename("empty", "folder")  # replacing a folder would remove it
    assert (server.home / "folder").is_dir() and (server.home / "empty").is_dir()
    ftp.quit()


def test_a_changed_or_removed_account_ends_its_open_session(
    serve: Callable[..., Server], clients: Clients, users: UserStore
) -> None:
    """`meterdrop users passwd` and `remove` revoke a leaked credential: open sessions too, not only new logins."""
    server = serve()
    ftp = clients.tls(server)
    assert ftp.storbinary("STOR before.csv", io.BytesIO(b"delivered before\n")).startswith("226")
    data = ftp.transfercmd("STOR during.csv")
    data.sendall(b"half an upload\n")
    users.remove(VENDOR)
    data.unwrap()
    data.close()
    with pytest.raises(ftplib.error_perm, match=r"^550 Not stored: your account was removed or changed"):
        ftp.voidresp()
    with pytest.raises(ftplib.error_perm, match=r"^530 Your account was removed or changed"):
        ftp.storbinary("STOR after.csv", io.BytesIO(b"x\n"))
    assert sorted(p.name for p in server.home.iterdir()) == ["before.csv"]
    assert server.published == [server.home / "before.csv"]


def test_names_up_to_the_file_system_limit_upload(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    name = "m" * 251 + ".csv"  # 255 bytes: with the partial's 15 more, the upload once got 550
    assert ftp.storbinary(f"STOR {name}", io.BytesIO(b"long name\n")).startswith("226")
    assert (server.home / name).read_bytes() == b"long name\n"
    assert hidden(server.home) == []
    ftp.quit()


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_curl_upload_creating_folders(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve()
    source = tmp_path / "meter-42.csv"
    source.write_bytes(payload(200_000))
    result = subprocess.run(
        [str(CURL), "--silent", "--show-error", "--ssl-reqd", "-k", "--ftp-pasv", "-T", str(source),
         f"ftp://{LOCAL}:{server.port}/folder/sub/", "--ftp-create-dirs", "--user", f"{VENDOR}:{VENDOR_PASSWORD}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    final = server.home / "folder" / "sub" / "meter-42.csv"
    assert final.read_bytes() == source.read_bytes()
    assert server.published == [final]
    assert hidden(server.home) == []


def test_binary_is_the_default_and_type_a_is_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    body = payload(10_000)
    conn = ftp.transfercmd("STOR no-type.csv")  # no TYPE command at all
    assert finish_upload(ftp, conn, body).startswith("226")
    assert (server.home / "no-type.csv").read_bytes() == body

    with pytest.raises(ftplib.error_perm, match=r"^504"):
        ftp.sendcmd("TYPE A")
    with pytest.raises(ftplib.error_perm, match=r"^504"):
        ftp.sendcmd("TYPE L 7")
    assert ftp.sendcmd("TYPE I").startswith("200")
    ftp.sendcmd("REIN")  # a fresh login starts binary again
    ftp.login(VENDOR, VENDOR_PASSWORD)
    ftp.prot_p()
    conn = ftp.transfercmd("STOR after-rein.csv")
    assert finish_upload(ftp, conn, body).startswith("226")
    assert (server.home / "after-rein.csv").read_bytes() == body


def test_upload_then_rename_and_folder_rules(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.mkd("out")
    ftp.cwd("out")
    assert ftp.pwd() == "/out"
    ftp.storbinary("STOR x.tmp", io.BytesIO(b"a,b\n1,2\n"))
    assert ftp.rename("x.tmp", "x.csv").startswith("250")
    assert sorted(p.name for p in (server.home / "out").iterdir()) == ["x.csv"]
    assert (server.home / "out" / "x.csv").read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.rename("x.csv", ".hidden.csv")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.storbinary("STOR missing-folder/y.csv", io.BytesIO(b"y"))
    assert not (server.home / "out" / "missing-folder").exists()
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.storbinary("STOR /out", io.BytesIO(b"onto a folder"))
    # REST before STOR (resuming an upload) is refused: uploads are whole files.
    with pytest.raises(ftplib.error_perm, match=r"^554"):
        ftp.storbinary("STOR x.csv", io.BytesIO(b"tail"), rest=4)
    assert (server.home / "out" / "x.csv").read_bytes() == b"a,b\n1,2\n"
    assert hidden(server.home) == []


def test_session_closing_with_queued_upload_leaves_nothing(
    serve: Callable[..., Server], clients: Clients
) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.sendcmd("TYPE I")
    ftp.sendcmd("PASV")  # a data connection is offered but never made
    assert ftp.sendcmd("STOR queued.csv").startswith("150")
    assert len(hidden(server.home)) == 1  # the partial exists while STOR waits
    ftp.close()
    eventually(lambda: hidden(server.home) == [], "the queued partial to be removed")
    assert not (server.home / "queued.csv").exists()
    assert server.published == []


def test_upload_whose_control_connection_went_first_is_discarded(
    serve: Callable[..., Server], clients: Clients
) -> None:
    """No 226 can reach a client that has gone: such an upload never counts (issue: only 226 counts)."""
    server = serve()
    ftp = clients.tls(server)
    data = ftp.transfercmd("STOR gone.csv")
    data.sendall(payload(200_000))
    ftp.sock.shutdown(socket.SHUT_RDWR)  # the control connection ends first, abruptly
    ftp.close()
    eventually(lambda: not server.ftps.handlers, "the server to see the control connection end")
    with contextlib.suppress(OSError):
        data.unwrap()  # then the data connection ends cleanly, with close_notify
    data.close()
    eventually(lambda: hidden(server.home) == [], "the partial to be removed")
    assert not (server.home / "gone.csv").exists()
    assert server.published == []


def test_empty_listings_and_empty_files_transfer_cleanly(
    serve: Callable[..., Server], clients: Clients
) -> None:
    # pyftpdlib "sends" an empty transfer before the data connection's TLS handshake has
    # even started; clients then saw a broken connection or 426 most of the time.
    server = serve()
    ftp = clients.tls(server)
    ftp.mkd("empty")
    ftp.storbinary("STOR empty.csv", io.BytesIO(b""))
    assert (server.home / "empty.csv").read_bytes() == b""
    for _ in range(20):
        assert names(ftp, "empty") == []
        assert listing(ftp, "MLSD empty") == []
        chunks: list[bytes] = []
        assert ftp.retrbinary("RETR empty.csv", chunks.append).startswith("226")
        assert chunks == []


# -- uploads that must not arrive -------------------------------------------------------
@pytest.mark.parametrize("how", ["fin", "reset"])
def test_upload_cut_off_without_close_notify_is_discarded(
    serve: Callable[..., Server], clients: Clients, how: str
) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd("STOR cut.csv")
    conn.sendall(payload(200_000))
    if how == "reset":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        conn.shutdown(socket.SHUT_RDWR)  # TCP FIN, no TLS close_notify
    conn.close()
    with pytest.raises(ftplib.error_temp, match=r"^426 .*close_notify"):
        ftp.voidresp()
    assert not (server.home / "cut.csv").exists()
    assert hidden(server.home) == []
    assert server.published == []
    # The session is still usable, and a proper upload of the same name works.
    ftp.storbinary("STOR cut.csv", io.BytesIO(b"whole\n"))
    assert (server.home / "cut.csv").read_bytes() == b"whole\n"


def test_client_vanishing_mid_upload_leaves_nothing(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd("STOR gone.csv")
    conn.sendall(payload(100_000))
    eventually(lambda: stat_bytes_received(ftp) > 0, "the server to receive data")
    assert ftp.sock is not None
    ftp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ftp.close()  # control connection reset while the data connection is open
    conn.close()
    eventually(lambda: hidden(server.home) == [], "the partial to be removed")
    assert not (server.home / "gone.csv").exists()
    assert server.published == []


def test_abor_mid_transfer_discards_the_upload(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd("STOR aborted.csv")
    conn.sendall(payload(100_000))
    eventually(lambda: stat_bytes_received(ftp) > 0, "the server to receive data")
    assert ftp.abort().startswith("426")
    assert ftp.voidresp().startswith("226")  # "ABOR command successful"
    conn.close()
    assert not (server.home / "aborted.csv").exists()
    assert hidden(server.home) == []
    assert server.published == []


def test_upload_over_the_size_limit_is_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve(max_upload_bytes=50_000)
    ftp = clients.tls(server)
    ftp.storbinary("STOR exact.csv", io.BytesIO(payload(50_000)))
    assert (server.home / "exact.csv").stat().st_size == 50_000

    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd("STOR big.csv")
    reply = finish_upload(ftp, conn, payload(200_000))
    assert reply.startswith("552"), reply
    assert not (server.home / "big.csv").exists()
    assert hidden(server.home) == []
    assert server.published == [server.home / "exact.csv"]


# -- TLS --------------------------------------------------------------------------------
def test_plain_text_login_is_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.plain(server)
    with pytest.raises(ftplib.error_perm, match=r"^530 .*AUTH TLS"):
        ftp.login(VENDOR, VENDOR_PASSWORD)
    with pytest.raises(ftplib.error_perm, match=r"^530 .*AUTH TLS"):
        ftp.sendcmd(f"PASS {VENDOR_PASSWORD}")
    with pytest.raises(ftplib.error_perm, match=r"^530"):
        ftp.sendcmd("PWD")  # not logged in
    with pytest.raises(ftplib.error_perm, match=r"^503"):
        ftp.sendcmd("PROT P")  # only after AUTH TLS


def test_unprotected_data_connections_are_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server, login=False)
    ftp.login(VENDOR, VENDOR_PASSWORD)  # AUTH TLS + login, no PROT P yet
    with pytest.raises(ftplib.error_perm, match=r"^521"):
        ftp.sendcmd("PASV")
    with pytest.raises(ftplib.error_perm, match=r"^521"):
        ftp.sendcmd("EPSV")
    ftp.sendcmd("PBSZ 0")
    with pytest.raises(ftplib.error_perm, match=r"^534"):
        ftp.sendcmd("PROT C")
    with pytest.raises(ftplib.error_perm, match=r"^521"):
        ftp.sendcmd("PASV")
    assert ftp.sendcmd("PROT P").startswith("200")
    assert ftp.sendcmd("PASV").startswith("227")


def openssl_s_client(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-starttls", "ftp", "-connect", f"{LOCAL}:{port}", *options],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_tls_versions_and_ciphers_with_openssl(serve: Callable[..., Server]) -> None:
    server = serve()
    modern = openssl_s_client(server.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    assert modern.returncode == 0 and "TLSv1.2" in modern.stdout, modern.stdout + modern.stderr
    assert openssl_s_client(server.port, "-tls1_3").returncode == 0
    # SECLEVEL=0 so that it is the server, not the local OpenSSL, that refuses.
    for old in ("-tls1_1", "-tls1"):
        refused = openssl_s_client(server.port, old, "-cipher", "DEFAULT@SECLEVEL=0")
        assert refused.returncode != 0 and "alert protocol version" in refused.stderr, refused.stderr
    for weak in ("AES128-SHA", "AES256-SHA256", "ECDHE-RSA-AES128-SHA"):  # no forward secrecy / CBC
        refused = openssl_s_client(server.port, "-tls1_2", "-cipher", f"{weak}@SECLEVEL=0")
        assert refused.returncode != 0 and "alert handshake failure" in refused.stderr, f"{weak} accepted"


def test_tls_1_1_is_refused_from_python(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT@SECLEVEL=0")
    ftp = ftplib.FTP_TLS(context=context, timeout=20)
    clients.open.append(ftp)
    ftp.connect(LOCAL, server.port)
    with pytest.raises(ssl.SSLError):
        ftp.auth()


def test_generated_certificate_is_kept_and_own_certificate_used(
    users: UserStore, guard: Guard, tmp_path: Path, clients: Clients
) -> None:
    generated = tmp_path / "generated"
    first = FtpsServer(
        host=LOCAL, port=0, passive_ports=range(1, 2), users=users, guard=guard, certs_dir=generated
    )
    first.stop()
    crt, key = (generated / "ftps.crt").read_bytes(), (generated / "ftps.key").read_bytes()
    assert stat.S_IMODE((generated / "ftps.key").stat().st_mode) == 0o600
    second = FtpsServer(
        host=LOCAL, port=0, passive_ports=range(1, 2), users=users, guard=guard, certs_dir=generated
    )
    second.stop()
    assert (generated / "ftps.crt").read_bytes() == crt and (generated / "ftps.key").read_bytes() == key

    own = tmp_path / "own"
    own.mkdir()
    own_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drop.example.net")])
    now = datetime.datetime.now(datetime.UTC)
    own_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(own_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("drop.example.net")]), critical=False)
        .sign(own_key, hashes.SHA256())
    )  # fmt: skip
    (own / "ftps.crt").write_bytes(own_cert.public_bytes(serialization.Encoding.PEM))
    (own / "ftps.key").write_bytes(
        own_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ftps = FtpsServer(host=LOCAL, port=0, passive_ports=range(1, 2), users=users, guard=guard, certs_dir=own)
    ftps.start()
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        ftp = ftplib.FTP_TLS(context=context, timeout=20)
        clients.open.append(ftp)
        ftp.connect(LOCAL, ftps.address[1])
        ftp.auth()
        assert isinstance(ftp.sock, ssl.SSLSocket)
        assert ftp.sock.getpeercert(binary_form=True) == own_cert.public_bytes(serialization.Encoding.DER)
        ftp.quit()
    finally:
        ftps.stop()

    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(own / "ftps.crt", half / "ftps.crt")
    with pytest.raises(CertificateError, match=r"ftps.key"):
        FtpsServer(host=LOCAL, port=0, passive_ports=range(1, 2), users=users, guard=guard, certs_dir=half)
    assert not (half / "ftps.key").exists()


def test_enforced_session_reuse(serve: Callable[..., Server], clients: Clients, tmp_path: Path) -> None:
    server = serve(tls_session_resumption="enforced")
    reusing = clients.tls(server, cls=SessionReusingFTP_TLS)
    reusing.storbinary("STOR reused.csv", io.BytesIO(b"resumed session\n"))
    assert (server.home / "reused.csv").read_bytes() == b"resumed session\n"

    plain = clients.tls(server)  # ftplib: a new TLS session on each data connection
    plain.sendcmd("TYPE I")
    conn = plain.transfercmd("STOR fresh.csv")
    reply = finish_upload(plain, conn, b"new session\n")
    assert reply.startswith("522"), reply
    assert not (server.home / "fresh.csv").exists()
    assert hidden(server.home) == []

    if CURL is not None:
        source = tmp_path / "curl.csv"
        source.write_bytes(b"curl resumes sessions\n")
        result = subprocess.run(
            [str(CURL), "-sS", "--ssl-reqd", "-k", "--ftp-pasv", "-T", str(source),
             f"ftp://{LOCAL}:{server.port}/", "--user", f"{VENDOR}:{VENDOR_PASSWORD}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (server.home / "curl.csv").read_bytes() == source.read_bytes()


# -- passive mode -----------------------------------------------------------------------
def listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.ip == LOCAL
    }


def test_passive_range_exhausted_answers_425_and_never_leaves_the_range(
    serve: Callable[..., Server], clients: Clients
) -> None:
    server = serve(passive_count=9)
    before = listening_ports()
    sessions = [clients.tls(server) for _ in range(10)]
    announced = []
    for ftp in sessions[:9]:
        reply = ftp.sendcmd("PASV")
        assert reply.startswith("227")
        announced.append(ftplib.parse227(reply)[1])
    assert sorted(announced) == list(server.passive)
    with pytest.raises(ftplib.error_temp, match=r"^425"):
        sessions[9].sendcmd("PASV")
    with pytest.raises(ftplib.error_temp, match=r"^425"):
        sessions[9].sendcmd("EPSV")
    assert listening_ports() - before == set(server.passive)

    assert sessions[0].sendcmd("ABOR").startswith("225")  # gives its port back
    sessions[9].storbinary("STOR tenth.csv", io.BytesIO(b"got a port\n"))
    assert (server.home / "tenth.csv").read_bytes() == b"got a port\n"


def test_a_pasv_waits_briefly_for_a_port_to_free(serve: Callable[..., Server], clients: Clients) -> None:
    """A burst of more clients than passive ports: the one without a port waits, then gets one."""
    server = serve(passive_count=1)
    first, second = clients.tls(server), clients.tls(server)
    assert first.sendcmd("PASV").startswith("227")
    second.putcmd("PASV")  # no port free now: the reply is deferred, not a 425
    freed = threading.Timer(0.3, lambda: first.sendcmd("ABOR"))
    freed.start()
    reply = second.getresp()
    freed.join()
    assert reply.startswith("227") and ftplib.parse227(reply)[1] == server.passive[0]


def test_a_port_is_busy_only_while_its_listener_waits(serve: Callable[..., Server], clients: Clients) -> None:
    # One passive port: a data connection in progress does not keep it from the next PASV.
    server = serve(passive_count=1)
    first, second = clients.tls(server), clients.tls(server)
    first.sendcmd("TYPE I")
    conn = first.transfercmd("STOR slow.csv")
    conn.sendall(b"first half,")
    eventually(lambda: stat_bytes_received(first) > 0, "the first upload to start")
    second.storbinary("STOR quick.csv", io.BytesIO(b"same port, later\n"))
    assert finish_upload(first, conn, b"second half\n").startswith("226")
    assert (server.home / "slow.csv").read_bytes() == b"first half,second half\n"
    assert (server.home / "quick.csv").read_bytes() == b"same port, later\n"


def test_public_host_is_announced(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve(public_host="203.0.113.7")
    ftp = clients.tls(server)
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    assert host == "203.0.113.7" and port in server.passive
    ftp.sendcmd("ABOR")
    # ftplib connects to the control host, so the upload still works on loopback.
    ftp.storbinary("STOR nat.csv", io.BytesIO(b"behind NAT\n"))
    assert (server.home / "nat.csv").exists()


def test_active_mode_is_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    with pytest.raises(ftplib.error_perm, match=r"^502 Active mode"):
        ftp.sendcmd("PORT 127,0,0,1,117,48")
    with pytest.raises(ftplib.error_perm, match=r"^502 Active mode"):
        ftp.sendcmd("EPRT |1|127.0.0.1|30000|")
    features = ftp.sendcmd("FEAT")
    for absent in ("EPRT", "MFMT"):
        assert absent not in features
    assert "AUTH TLS" in features and "EPSV" in features


def test_data_connection_from_another_address_is_refused(
    serve: Callable[..., Server], clients: Clients
) -> None:
    server = serve()
    ftp = clients.tls(server)
    _, port = ftplib.parse227(ftp.sendcmd("PASV"))
    intruder = socket.socket()
    try:
        intruder.bind(("127.0.0.2", 0))
    except OSError:
        intruder.close()
        pytest.skip("cannot bind 127.0.0.2 on this machine")
    with intruder:
        intruder.settimeout(20)
        intruder.connect((LOCAL, port))
        with pytest.raises(ftplib.error_temp, match=r"^425 Rejected data connection from foreign address"):
            ftp.getresp()
        with contextlib.suppress(ConnectionResetError):
            assert intruder.recv(1) == b""
    ftp.sendcmd("ABOR")
    ftp.storbinary("STOR ok.csv", io.BytesIO(b"from the right address\n"))
    assert (server.home / "ok.csv").exists()
    assert server.published == [server.home / "ok.csv"]


# -- confinement ------------------------------------------------------------------------
def test_paths_cannot_escape_the_users_folder(
    serve: Callable[..., Server], clients: Clients, users: UserStore, tmp_path: Path
) -> None:
    server = serve()
    home = server.home
    data_dir = users.data_dir
    users.add("other", "other-pass")
    (users.home("other") / "theirs.csv").write_bytes(b"not yours\n")
    outside = tmp_path / "outside-secret.csv"
    outside.write_bytes(b"secret\n")
    (home / "planted").mkdir()
    os.symlink(outside, home / "planted" / "link.csv")
    os.symlink(tmp_path, home / "dirlink")
    ftp = clients.tls(server)

    # ".." stops at the user's root; absolute paths are inside it.
    ftp.cwd("../../..")
    assert ftp.pwd() == "/"
    for path in ("../other/theirs.csv", "/../other/theirs.csv", "../../users.json", "/etc/passwd",
                 "%2e%2e/other/theirs.csv", "dirlink/outside-secret.csv", "planted/link.csv",
                 "/planted/../planted/link.csv"):  # fmt: skip
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.retrbinary(f"RETR {path}", lambda _: None)
    for folder in ("/other", "../other", "dirlink", "/etc", "%2e%2e"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.cwd(folder)
    with pytest.raises(ftplib.error_perm, match=r"^550 NUL"):
        ftp.sendcmd("CWD planted\x00/../..")
    with pytest.raises(ftplib.error_perm, match=r"^550 NUL"):
        ftp.sendcmd("SIZE a\x00b")

    # Writing through a symlink or to a hidden name is refused; ".." is clamped.
    for target in ("dirlink/dropped.csv", "planted/link.csv", ".hidden.csv", "planted/.x.csv"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.storbinary(f"STOR {target}", io.BytesIO(b"x"))
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.mkd(".config")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.rename("planted/link.csv", "mine.csv")
    ftp.storbinary("STOR ../../escape.csv", io.BytesIO(b"clamped\n"))
    assert (home / "escape.csv").read_bytes() == b"clamped\n"
    assert ftp.mkd("%2e%2e") == "/%2e%2e"  # a literal, harmless name
    assert (home / "%2e%2e").is_dir()

    # Nothing appeared outside the home folder; nothing outside was changed.
    assert not (data_dir / "escape.csv").exists() and not (data_dir / "drop" / "escape.csv").exists()
    assert not (tmp_path / "dropped.csv").exists()
    assert outside.read_bytes() == b"secret\n"
    assert (users.home("other") / "theirs.csv").read_bytes() == b"not yours\n"
    # Listings show neither symlinks nor hidden files.
    (home / ".in-progress.part-1234").write_bytes(b"partial")
    assert names(ftp) == ["%2e%2e", "escape.csv", "planted"]
    assert names(ftp, "planted") == []
    assert sorted(line.split("; ", 1)[1] for line in listing(ftp, "MLSD /")) == [
        "%2e%2e",
        "escape.csv",
        "planted",
    ]


def test_delete_remove_chmod_mfmt_appe_are_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.mkd("keep")
    ftp.storbinary("STOR keep/a.csv", io.BytesIO(b"a\n"))
    with pytest.raises(ftplib.error_perm, match=r"^550 Deleting"):
        ftp.delete("keep/a.csv")
    with pytest.raises(ftplib.error_perm, match=r"^550 Removing"):
        ftp.rmd("keep")
    with pytest.raises(ftplib.error_perm, match=r"^550 Removing"):
        ftp.sendcmd("XRMD keep")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.sendcmd("SITE CHMOD 777 keep/a.csv")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        ftp.sendcmd("MFMT 20000101000000 keep/a.csv")
    with pytest.raises(ftplib.error_perm, match=r"^502"):
        ftp.storbinary("APPE keep/a.csv", io.BytesIO(b"more\n"))
    with pytest.raises(ftplib.error_perm, match=r"^502"):
        ftp.sendcmd("STOU")
    assert (server.home / "keep" / "a.csv").read_bytes() == b"a\n"
    mode = stat.S_IMODE((server.home / "keep" / "a.csv").stat().st_mode)
    assert mode != 0o777


# -- logins -----------------------------------------------------------------------------
def test_anonymous_and_wrong_passwords_are_refused(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    for user, password in (
        ("anonymous", "guest@example.com"),
        ("ftp", ""),
        (VENDOR, "wrong"),
        ("nobody", "x"),
    ):
        ftp = clients.tls(server, login=False)
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            ftp.login(user, password)
        ftp.close()


def test_failed_logins_are_delayed_without_blocking_others(
    serve: Callable[..., Server], clients: Clients, users: UserStore
) -> None:
    slow = Guard(GuardPolicy(max_failures=5, window=60, ban_seconds=60, delay_per_failure=1.5, max_delay=4))
    server = serve(guard=slow)
    attacker = clients.tls(server, login=False)
    attacker.auth()
    attacker.sendcmd(f"USER {VENDOR}")
    sent = time.monotonic()
    attacker.putcmd("PASS wrong")
    # Meanwhile another client logs in and works normally.
    other = clients.tls(server)
    other.storbinary("STOR meanwhile.csv", io.BytesIO(b"not blocked\n"))
    other_done = time.monotonic()
    with pytest.raises(ftplib.error_perm, match=r"^530"):
        attacker.getresp()
    answered = time.monotonic()
    assert answered - sent >= 1.5
    assert other_done < answered


def test_pipelined_commands_after_pass_are_answered_in_order(
    serve: Callable[..., Server], clients: Clients
) -> None:
    server = serve()
    ftp = clients.tls(server, login=False)
    ftp.auth()
    assert ftp.sock is not None
    ftp.sock.sendall(
        f"USER {VENDOR}\r\nPASS wrong\r\nPWD\r\nUSER {VENDOR}\r\nPASS {VENDOR_PASSWORD}\r\nPWD\r\n".encode()
    )
    replies: list[str] = []
    for _ in range(6):
        try:
            replies.append(ftp.getresp()[:3])
        except ftplib.error_perm as error:
            replies.append(str(error)[:3])
    assert replies == ["331", "530", "530", "331", "230", "257"]


def test_repeated_failures_ban_the_address(serve: Callable[..., Server], clients: Clients) -> None:
    strict = Guard(
        GuardPolicy(max_failures=3, window=60, ban_seconds=60, delay_per_failure=0.01, max_delay=0.05)
    )
    server = serve(guard=strict)
    waiting = clients.tls(server, login=False)  # connected before the ban
    waiting.auth()
    waiting.sendcmd(f"USER {VENDOR}")

    ftp = clients.tls(server, login=False)
    for attempt in range(3):
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            ftp.login(VENDOR, f"guess-{attempt}")
    assert strict.is_banned(LOCAL)

    with pytest.raises(ftplib.error_temp, match=r"^421 Too many failed logins"):
        clients.tls(server, login=False)  # refused at connect, before any password
    with pytest.raises(ftplib.error_temp, match=r"^421 Too many failed logins"):
        waiting.sendcmd(f"PASS {VENDOR_PASSWORD}")  # the right password no longer helps


# -- limits and shutdown ----------------------------------------------------------------
def test_connections_per_address_are_limited(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve(max_connections_per_ip=2)
    clients.tls(server, login=False)
    clients.tls(server, login=False)
    with pytest.raises(ftplib.error_temp, match=r"^421"):
        clients.tls(server, login=False)


def test_idle_sessions_are_closed(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve(idle_timeout=1)
    ftp = clients.tls(server)
    with pytest.raises(ftplib.error_temp, match=r"^421 Control connection timed out"):
        ftp.getresp()  # nothing sent: the next thing the server says is the timeout


def test_stop_discards_uploads_in_progress(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve()
    ftp = clients.tls(server)
    ftp.sendcmd("TYPE I")
    conn = ftp.transfercmd("STOR interrupted.csv")
    conn.sendall(payload(50_000))
    eventually(lambda: stat_bytes_received(ftp) > 0, "the server to receive data")
    port = server.port
    server.ftps.stop()
    conn.close()
    assert hidden(server.home) == []
    assert not (server.home / "interrupted.csv").exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCAL, port), timeout=5).close()


def test_server_thread_survives_many_sessions(serve: Callable[..., Server], clients: Clients) -> None:
    server = serve(passive_count=8)
    errors: list[BaseException] = []

    def deliver(index: int) -> None:
        try:
            ftp = ftplib.FTP_TLS(context=client_context(server.certs), timeout=30)
            ftp.connect(LOCAL, server.port)
            ftp.login(VENDOR, VENDOR_PASSWORD)
            ftp.prot_p()
            for n in range(3):
                ftp.storbinary(f"STOR c{index}-{n}.csv", io.BytesIO(payload(20_000 + index)))
            ftp.quit()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(server.published) == 24
    assert hidden(server.home) == []


def test_dual_stack_listener_serves_ipv4_clients(users: UserStore, certs: Path, clients: Clients) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 on this machine")
    strict = Guard(
        GuardPolicy(max_failures=3, window=60, ban_seconds=60, delay_per_failure=0.01, max_delay=0.05)
    )
    ftps = FtpsServer(
        host="::", port=0, passive_ports=free_port_range(2), users=users, guard=strict, certs_dir=certs
    )
    ftps.start()
    try:
        server = Server(ftps, range(0), users.home(VENDOR), certs)
        ftp = clients.tls(server)
        host, _ = ftplib.parse227(ftp.sendcmd("PASV"))
        assert host == LOCAL  # the IPv4-mapped address is announced as plain IPv4
        ftp.sendcmd("ABOR")
        ftp.storbinary("STOR v4.csv", io.BytesIO(b"over a dual-stack socket\n"))
        assert (server.home / "v4.csv").exists()
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            clients.tls(server, password="wrong")
        strict.failed(LOCAL)
        strict.failed(LOCAL)  # scored under "127.0.0.1", as SFTP would score it
        assert strict.is_banned(LOCAL)
    finally:
        ftps.stop()
