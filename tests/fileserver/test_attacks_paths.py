"""Path attacks on both protocols: nothing outside the user's folder is read, listed or changed.

Each test plants, on disk, what an attacker would aim at: a secret file outside every drop
folder, another user's delivery, and inside the attacker's own folder symlinks (absolute,
relative, dangling, to a folder, to the other user's folder) and hard links (to the secret
and to the other user's file) -- as someone with shell access, a restored backup or a
careless admin could leave them.  Then real clients (asyncssh, OpenSSH ``sftp``,
``ftplib.FTP_TLS``, ``curl``) try ``..``, ``%2e%2e``, absolute paths, NUL bytes, overlong
names, backslashes, look-alike dots, invalid UTF-8, reading/writing/renaming through the
links, and renames across users.

What is asserted, for every attempt:

* the attempt is refused (the specific refusal where one is specified: links are
  "permission denied" / ``550``),
* no byte of the secret's or the other user's content reaches the client, and no listing
  names them or the planted links,
* the whole tree outside the attacker's folder (the data dir with ``users.json`` and the
  other user's folder, the secret's folder) is identical afterwards -- nothing created,
  overwritten, renamed or removed -- and neither server announced a link as a delivery.
"""

from __future__ import annotations

import ftplib
import io
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from fileserver.users import UserStore

from .attack_harness import LOCAL, DropBox, ftps_listing, openssh_sftp_batch, tree_state
from .conftest import VENDOR, VENDOR_PASSWORD
from .test_sftp import keygen, run

OTHER, OTHER_PASSWORD = "other", "other-pass-9"
SECRET = b"TOP-SECRET-7f3a9c: outside every drop folder\n"
THEIRS = b"OTHER-USERS-DATA-51d2,device,energy\n"
MINE = b"device,energy\n1,2\n"
# Names that no listing given to the attacker may contain.
NEVER_LISTED = ("secret.txt", "theirs.csv", "users.json", "sym-", "hard", "inner")

# Planted in the attacker's folder (name -> what it leads to), see ``planted``.
LINKS = (
    "sym-file.csv",  # absolute symlink to the secret
    "sym-relative.csv",  # relative symlink climbing to the secret
    "sym-dangling.csv",  # symlink to a file that does not exist yet, outside
    "sym-dir/secret.txt",  # through a symlink to the secret's folder
    "sym-dir",
    "sym-other/theirs.csv",  # through a symlink to the other user's folder
    "sym-other",
    "hard.csv",  # hard link to the secret
    "hard-other.csv",  # hard link to the other user's file
    "planted/inner.csv",  # symlink one folder down
    "planted/inner-hard.csv",  # hard link one folder down
    "/sym-file.csv",
    "planted/../sym-file.csv",
)


def escapes(planted: Planted) -> list[str]:
    """Paths that try to leave the folder by name alone: each must be refused or stay inside."""
    return [
        "../../../outside/secret.txt",
        "/../../../outside/secret.txt",
        "../" * 12 + "outside/secret.txt",
        str(planted.secret),  # the real absolute path
        str(planted.theirs),
        "/etc/passwd",
        "../other/theirs.csv",
        "/../other/theirs.csv",
        "../../drop/other/theirs.csv",
        "../../users.json",
        "%2e%2e/%2e%2e/%2e%2e/outside/secret.txt",
        "..%2f..%2f..%2foutside%2fsecret.txt",
        "%252e%252e/%252e%252e/users.json",
        "..\\..\\..\\outside\\secret.txt",
        "\uff0e\uff0e/\uff0e\uff0e/\uff0e\uff0e/outside/secret.txt",  # fullwidth dots
        "..\u2215..\u2215..\u2215outside\u2215secret.txt",  # division slash
        "mine.csv\x00/../../../outside/secret.txt",
        "\x00../other/theirs.csv",
        "a" * 256,
        "\u00e9" * 128 + ".csv",  # 260 bytes in UTF-8
        "a/" * 2100 + "secret.txt",  # longer than PATH_MAX
    ]


@dataclass
class Planted:
    root: Path  # everything under it, except ``home``, must stay as it was
    home: Path
    other_home: Path
    outside: Path
    secret: Path
    theirs: Path
    before: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)  # everything the attacker got back

    def got(self, data: bytes | str) -> None:
        self.received.append(data.encode(errors="replace") if isinstance(data, str) else data)

    def assert_nothing_leaked_or_changed(self, box: DropBox) -> None:
        everything = b"\n".join(self.received)
        assert SECRET.strip() not in everything and b"TOP-SECRET" not in everything
        assert THEIRS.strip() not in everything and b"OTHER-USERS-DATA" not in everything
        assert tree_state(self.root, skip=[self.home]) == self.before
        assert self.secret.read_bytes() == SECRET and self.theirs.read_bytes() == THEIRS
        assert not (self.outside / "created-through-link.csv").exists()
        for path in box.published:
            assert path.is_relative_to(self.home) and not path.is_symlink(), path
            assert path.stat().st_nlink == 1, path
        print(
            f"{len(self.received)} replies checked, 0 bytes of the secret or the other user's file among "
            f"{len(everything)} bytes received; {len(self.before)} entries outside the folder unchanged"
        )


@pytest.fixture
def planted(tmp_path: Path, users: UserStore) -> Planted:
    users.add(OTHER, OTHER_PASSWORD)
    home, other_home = users.home(VENDOR), users.home(OTHER)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(SECRET)
    theirs = other_home / "theirs.csv"
    theirs.write_bytes(THEIRS)
    (home / "mine.csv").write_bytes(MINE)
    os.symlink(secret, home / "sym-file.csv")
    os.symlink(os.path.relpath(secret, home), home / "sym-relative.csv")
    os.symlink(outside / "created-through-link.csv", home / "sym-dangling.csv")
    os.symlink(outside, home / "sym-dir")
    os.symlink(other_home, home / "sym-other")
    os.link(secret, home / "hard.csv")
    os.link(theirs, home / "hard-other.csv")
    (home / "planted").mkdir()
    os.symlink(secret, home / "planted" / "inner.csv")
    os.link(theirs, home / "planted" / "inner-hard.csv")
    (home / "planted" / "real.csv").write_bytes(MINE)
    state = Planted(tmp_path, home, other_home, outside, secret, theirs)
    state.before = tree_state(tmp_path, skip=[home])
    return state


# -- SFTP (asyncssh client) ----------------------------------------------------------------
async def _refused(
    planted: Planted, call: Awaitable[Any], kind: type[BaseException] = asyncssh.SFTPError
) -> str:
    """Await ``call``; it must fail with ``kind``.  Whatever it returned is kept as received."""
    try:
        result = await call
    except kind as error:
        planted.got(str(error))  # the refusal's text must not carry anything either
        return str(error)
    planted.got(repr(result))
    pytest.fail(f"not refused, returned {result!r}")


async def _read_all(sftp: asyncssh.SFTPClient, path: str | bytes) -> bytes:
    async with sftp.open(path, "rb") as handle:
        data: bytes = await handle.read()
        return data


def test_sftp_reads_stats_and_listings_cannot_leave_the_folder(planted: Planted, box: DropBox) -> None:
    async def attack() -> None:
        async with box.sftp_connect() as conn, conn.start_sftp_client() as sftp:
            for path in [*escapes(planted), *LINKS]:
                await _refused(planted, _read_all(sftp, path))
                await _refused(planted, sftp.stat(path))
                await _refused(planted, sftp.lstat(path))
                await _refused(planted, sftp.listdir(path))
                await _refused(planted, sftp.readlink(path))
            for path in LINKS:  # a link is refused as such, not merely "not found"
                for call in (_read_all(sftp, path), sftp.stat(path), sftp.lstat(path), sftp.realpath(path)):
                    await _refused(planted, call, asyncssh.SFTPPermissionDenied)
            await _refused(planted, _read_all(sftp, b"\xff\xfe/../../../outside/secret.txt"))
            # ".." stops at the root, and the root's ".." shows the root itself, not drop/.
            assert await sftp.realpath("../../..") == "/"
            assert await sftp.realpath("../../../outside/secret.txt") == "/outside/secret.txt"
            top = {name.filename: name.attrs for name in await sftp.readdir("/")}
            planted.got(repr(top))
            assert vars(top["."]) == vars(top[".."])  # SFTPAttrs has no __eq__
            assert sorted(top) == [".", "..", "mine.csv", "planted"]  # no symlink, no hard link
            assert await sftp.listdir("..") == await sftp.listdir("/")
            assert sorted(await sftp.listdir("planted")) == [".", "..", "real.csv"]
            assert await _read_all(sftp, "mine.csv") == MINE  # the folder itself still works
            assert await _read_all(sftp, "sym-dir/../mine.csv") == MINE  # ".." is lexical

    run(attack())
    planted.assert_nothing_leaked_or_changed(box)


def test_sftp_writes_cannot_leave_the_folder_or_go_through_links(planted: Planted, box: DropBox) -> None:
    async def write(sftp: asyncssh.SFTPClient, path: str, mode: str = "wb") -> None:
        async with sftp.open(path, mode) as handle:
            await handle.write(b"PWNED\n")

    async def attack() -> None:
        async with box.sftp_connect() as conn, conn.start_sftp_client() as sftp:
            for path in LINKS:
                for mode in ("wb", "ab", "r+b", "xb"):
                    await _refused(planted, write(sftp, path, mode), asyncssh.SFTPPermissionDenied)
                await _refused(planted, sftp.mkdir(f"{path}/sub"))
                await _refused(planted, sftp.setstat(path, asyncssh.SFTPAttrs(permissions=0o777)))
            for path in escapes(planted):
                # Either refused, or clamped into the folder (checked below by the tree state).
                for call in (write(sftp, path), sftp.mkdir(path), sftp.symlink(str(planted.secret), path)):
                    try:
                        planted.got(repr(await call))
                    except asyncssh.SFTPError as error:
                        planted.got(str(error))
            for link, target in (("new-link.csv", str(planted.secret)), ("rel.csv", "../../../outside")):
                await _refused(planted, sftp.symlink(target, link), asyncssh.SFTPPermissionDenied)
            await _refused(planted, sftp.link("hard.csv", "hard-again.csv"))
            await _refused(planted, sftp.link(str(planted.secret), "hard-new.csv"))

    run(attack())
    planted.assert_nothing_leaked_or_changed(box)
    home = planted.home
    assert (home / "hard.csv").stat().st_nlink == 2 and (home / "hard.csv").read_bytes() == SECRET
    assert os.readlink(home / "sym-dangling.csv") == str(planted.outside / "created-through-link.csv")
    links = sorted(p.name for p in home.rglob("*") if p.is_symlink())
    assert links == [
        "inner.csv",
        "sym-dangling.csv",
        "sym-dir",
        "sym-file.csv",
        "sym-other",
        "sym-relative.csv",
    ]


def test_sftp_renames_stay_in_the_folder_and_never_move_a_link(planted: Planted, box: DropBox) -> None:
    other = str(planted.other_home / "stolen.csv")
    refused_renames = [
        ("mine.csv", "../other/stolen.csv"),
        ("mine.csv", "/../../other/stolen.csv"),
        ("mine.csv", other),
        ("mine.csv", "../../../outside/stolen.csv"),
        ("../other/theirs.csv", "got.csv"),
        ("/../other/theirs.csv", "got.csv"),
        (str(planted.theirs), "got.csv"),
        ("../../users.json", "users.csv"),
    ]
    through_links = [
        ("mine.csv", "sym-other/stolen.csv"),
        ("mine.csv", "sym-dir/stolen.csv"),
        ("mine.csv", "sym-file.csv"),
        ("mine.csv", "sym-dangling.csv"),
        ("mine.csv", "hard.csv"),
        ("mine.csv", "hard-other.csv"),
        ("sym-other/theirs.csv", "got.csv"),
        ("sym-file.csv", "got.csv"),
        ("hard.csv", "got.csv"),
        ("hard-other.csv", "got.csv"),
        ("sym-dir", "got-dir"),
        ("planted/inner.csv", "got.csv"),
    ]

    async def attack() -> None:
        async with box.sftp_connect() as conn, conn.start_sftp_client() as sftp:
            for old, new in refused_renames:
                await _refused(planted, sftp.rename(old, new))
                await _refused(planted, sftp.posix_rename(old, new))
            for old, new in through_links:
                await _refused(planted, sftp.rename(old, new), asyncssh.SFTPPermissionDenied)
                await _refused(planted, sftp.posix_rename(old, new), asyncssh.SFTPPermissionDenied)
            # A folder holding planted links may be renamed (the links move with it, still
            # refused), but a link inside must never be announced to the processor as a
            # delivery: it would ingest the file outside that the link leads to.
            await sftp.rename("planted", "moved")
            for path in ("moved/inner.csv", "moved/inner-hard.csv"):
                await _refused(planted, _read_all(sftp, path), asyncssh.SFTPPermissionDenied)
            # A folder of one's own called "other" is just that.
            await sftp.mkdir("other")
            await sftp.rename("mine.csv", "../other/mine.csv")

    run(attack())
    planted.assert_nothing_leaked_or_changed(box)
    home = planted.home
    assert box.sftp.published == [home / "moved" / "real.csv", home / "other" / "mine.csv"]
    assert (home / "other" / "mine.csv").read_bytes() == MINE
    assert sorted(p.name for p in planted.other_home.iterdir()) == ["theirs.csv"]


def test_openssh_sftp_cannot_get_put_or_rename_outside(
    planted: Planted, box: DropBox, tmp_path_factory: pytest.TempPathFactory, users: UserStore
) -> None:
    workdir = tmp_path_factory.mktemp("openssh-client")  # not under the compared tree
    key = keygen(workdir / "id_ed25519", "-t", "ed25519")
    users.remove(VENDOR)
    users.add(VENDOR, VENDOR_PASSWORD, keys=[key.with_name("id_ed25519.pub").read_text()])
    planted.before = tree_state(planted.root, skip=[planted.home])  # users.json changed: the key
    (workdir / "upload.csv").write_bytes(b"PWNED\n")
    gets = ["../../../outside/secret.txt", "/../other/theirs.csv", str(planted.secret), "sym-file.csv",
            "sym-relative.csv", "hard.csv", "hard-other.csv", "sym-dir/secret.txt", "sym-other/theirs.csv",
            "planted/inner.csv", "planted/inner-hard.csv"]  # fmt: skip
    script = "".join(f"-get {path} got-{n}\n" for n, path in enumerate(gets))
    script += (
        "-put upload.csv sym-dangling.csv\n-put upload.csv sym-dir/dropped.csv\n-put upload.csv hard.csv\n"
        "-put upload.csv sym-other/dropped.csv\n-put upload.csv ../../../outside/dropped.csv\n"
        "-rename mine.csv ../other/stolen.csv\n-rename mine.csv sym-other/stolen.csv\n"
        "-rename hard.csv plain.csv\n-rename sym-file.csv plain.csv\n"
        "-ln -s ../../../outside/secret.txt new-link\n-ln hard.csv hard-again.csv\n"
        "-cd sym-dir\n-cd ../other\n-ls -la sym-dir\n-ls -la ../other\n"
        "ls -la\nls -la ..\nls -la /\nls -la planted\n"
    )
    result = openssh_sftp_batch(box.sftp_port, key, script, workdir)
    planted.got(result.stdout)
    planted.got(result.stderr)
    assert result.returncode == 0, result.stderr  # the unprefixed listings succeeded
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith("got-")) == []
    listing = result.stdout[result.stdout.index("sftp> ls -la\n") :]
    for name in NEVER_LISTED:
        assert name not in listing, name
    assert "mine.csv" in listing and "real.csv" in listing
    stderr = result.stderr
    # OpenSSH resolves a get's name first (realpath, stat): links and escapes are not found.
    for path in gets:
        shown = path if path.startswith("/") else f"/{path}"
        assert f'File "{shown}" not found.' in stderr, path
    for path in ("sym-dangling.csv", "sym-dir/dropped.csv", "hard.csv", "sym-other/dropped.csv"):
        assert f'dest open "/{path}": Permission denied' in stderr, path
    assert 'dest open "/../../../outside/dropped.csv": No such file or directory' in stderr
    assert 'remote rename "/mine.csv" to "/../other/stolen.csv": No such file or directory' in stderr
    for old, new in (
        ("mine.csv", "sym-other/stolen.csv"),
        ("hard.csv", "plain.csv"),
        ("sym-file.csv", "plain.csv"),
    ):
        assert f'remote rename "/{old}" to "/{new}": Permission denied' in stderr, old
    assert 'remote symlink file "../../../outside/secret.txt" to "/new-link": Permission denied' in stderr
    assert "Server does not support hardlink@openssh.com extension" in stderr
    assert "realpath /sym-dir: symlink in path" in stderr
    planted.assert_nothing_leaked_or_changed(box)
    assert box.sftp.published == []
    assert not (planted.home / "new-link").exists() and not (planted.home / "hard-again.csv").exists()


# -- FTPS (ftplib) -------------------------------------------------------------------------
def _ftp_refused(planted: Planted, call: Callable[[], Any], code: str | None = None) -> str:
    """Run an ftplib call that must be refused with a 5xx (``code`` if given) reply."""
    try:
        result = call()
    except ftplib.error_perm as error:
        reply = str(error)
        planted.got(reply)
        if code is not None:
            assert reply.startswith(code), reply
        return reply
    planted.got(repr(result))
    pytest.fail(f"not refused: {result!r}")


def test_ftps_reads_and_listings_cannot_leave_the_folder(planted: Planted, box: DropBox) -> None:
    ftp = box.ftps_login()
    try:
        for path in [*escapes(planted), *LINKS]:
            if len(path.encode()) > 2000:
                continue  # sent below as one overlong line
            _ftp_refused(planted, lambda p=path: ftp.retrbinary(f"RETR {p}", planted.got))  # type: ignore[misc]
            for command in ("SIZE", "MDTM", "MLST", "CWD"):
                _ftp_refused(planted, lambda c=command, p=path: ftp.sendcmd(f"{c} {p}"))  # type: ignore[misc]
            for command in ("LIST", "NLST", "MLSD"):
                _ftp_refused(planted, lambda c=command, p=path: ftps_listing(ftp, f"{c} {p}"))  # type: ignore[misc]
            try:  # STAT with a path lists over the control connection
                planted.got(ftp.sendcmd(f"STAT {path}"))
            except ftplib.error_perm as error:
                planted.got(str(error))
        for path in LINKS:  # refused by name, with the reason
            _ftp_refused(planted, lambda p=path: ftp.sendcmd(f"SIZE {p}"), "550")  # type: ignore[misc]
        # A command line past 2048 bytes gets exactly one reply, and its tail is not run.
        assert ftp.sock is not None
        ftp.sock.sendall(b"RETR " + b"a/" * 1100 + b"\r\nNOOP\r\n")
        _ftp_refused(planted, ftp.getresp, "500 Command too long")
        assert ftp.getresp().startswith("200")
        # The line's end in a TLS record of its own: pyftpdlib alone ran it as a command.
        ftp.sock.sendall(b"CWD " + b"x" * 2100)
        ftp.sock.sendall(b"MKD smuggled\r\nPWD\r\n")
        _ftp_refused(planted, ftp.getresp, "500 Command too long")
        assert ftp.getresp() == '257 "/" is the current directory.'
        # ".." stops at the root; listings show neither links nor hidden files.
        ftp.cwd("../../..")
        assert ftp.pwd() == "/"
        for command in ("NLST", "LIST", "MLSD", "LIST -la", "NLST ..", "MLSD /..", "LIST planted"):
            listing = ftps_listing(ftp, command)
            planted.got(listing)
            for name in NEVER_LISTED:
                assert name.encode() not in listing, (command, name)
        assert sorted(ftps_listing(ftp, "NLST").decode().split()) == ["mine.csv", "planted"]
        status = ftp.sendcmd("STAT /")
        planted.got(status)
        assert "mine.csv" in status and "sym-" not in status and "hard" not in status
        mine: list[bytes] = []
        ftp.retrbinary("RETR sym-dir/../mine.csv", mine.append)  # ".." is lexical
        assert b"".join(mine) == MINE
        ftp.quit()
    finally:
        ftp.close()
    assert not (planted.home / "smuggled").exists()
    planted.assert_nothing_leaked_or_changed(box)


def test_ftps_writes_and_renames_cannot_leave_the_folder(planted: Planted, box: DropBox) -> None:
    ftp = box.ftps_login()
    short_escapes = [p for p in escapes(planted) if len(p.encode()) <= 2000]
    try:
        for path in LINKS:
            _ftp_refused(planted, lambda p=path: ftp.storbinary(f"STOR {p}", io.BytesIO(b"PWNED\n")), "550")  # type: ignore[misc]
            _ftp_refused(planted, lambda p=path: ftp.mkd(f"{p}/sub"), "550")  # type: ignore[misc]
            _ftp_refused(planted, lambda p=path: ftp.rename(p, "got.csv"), "550")  # type: ignore[misc]
            _ftp_refused(planted, lambda p=path: ftp.rename("mine.csv", p), "550")  # type: ignore[misc]
        for path in short_escapes:  # none of these names exists inside the folder
            _ftp_refused(planted, lambda p=path: ftp.rename(p, "got.csv"), "550")  # type: ignore[misc]
        # Renames across users: RNTO names a path inside the own folder only.
        for target in ("../other/stolen.csv", "/../../other/stolen.csv", str(planted.other_home / "s.csv")):
            _ftp_refused(planted, lambda t=target: ftp.rename("mine.csv", t), "550")  # type: ignore[misc]
        ftp.rename("planted", "moved")  # the links move along, and stay refused
        _ftp_refused(planted, lambda: ftp.retrbinary("RETR moved/inner.csv", planted.got), "550")
        _ftp_refused(planted, lambda: ftp.retrbinary("RETR moved/inner-hard.csv", planted.got), "550")
        for path in short_escapes:  # refused, or clamped into the folder: the tree state decides
            for call in (
                lambda p=path: ftp.storbinary(f"STOR {p}", io.BytesIO(b"PWNED\n")),
                lambda p=path: ftp.mkd(p),
            ):
                try:
                    planted.got(repr(call()))
                except ftplib.error_perm as error:
                    planted.got(str(error))
        ftp.quit()
    finally:
        ftp.close()
    planted.assert_nothing_leaked_or_changed(box)
    home = planted.home
    assert (home / "mine.csv").read_bytes() == MINE
    assert (home / "hard.csv").read_bytes() == SECRET and (home / "hard-other.csv").read_bytes() == THEIRS
    assert sorted(p.name for p in planted.other_home.iterdir()) == ["theirs.csv"]


# -- FTPS (curl) ---------------------------------------------------------------------------
def _curl(box: DropBox, url_path: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(box.certs / "ftps.crt"),
         "--max-time", "30", "--user", f"{VENDOR}:{VENDOR_PASSWORD}", *args,
         f"ftp://{LOCAL}:{box.ftps_port}/{url_path}"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_cannot_download_upload_or_rename_outside(
    planted: Planted, box: DropBox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client = tmp_path_factory.mktemp("curl-client")  # not under the compared tree
    upload = client / "upload.csv"
    upload.write_bytes(b"PWNED\n")
    out = client / "curl-out"
    downloads = [
        "../../../outside/secret.txt",
        "%2e%2e/%2e%2e/%2e%2e/outside/secret.txt",
        "%2E%2E%2F%2E%2E%2F%2E%2E%2Foutside%2Fsecret.txt",
        "/../other/theirs.csv",
        f"{planted.secret}",
        "sym-file.csv",
        "sym-relative.csv",
        "hard.csv",
        "hard-other.csv",
        "sym-dir/secret.txt",
        "sym-other/theirs.csv",
        "planted/inner.csv",
    ]
    for path in downloads:
        for method in ("multicwd", "nocwd", "singlecwd"):
            result = _curl(box, path, "--path-as-is", "--ftp-method", method, "-o", str(out))
            planted.got(result.stdout + result.stderr)
            if out.exists():
                planted.got(out.read_bytes())
                out.unlink()
            assert result.returncode != 0, (path, method)
    for path in (
        "sym-dangling.csv",
        "sym-dir/",
        "sym-other/",
        "hard.csv",
        "../../../outside/",
        "%2e%2e/%2e%2e/",
    ):
        result = _curl(box, path, "--path-as-is", "-T", str(upload), "--ftp-create-dirs")
        planted.got(result.stdout + result.stderr)
        assert result.returncode != 0 or not path.startswith(("sym", "hard")), (path, result.stderr)
    for source, target in (("mine.csv", "../other/stolen.csv"), ("../other/theirs.csv", "got.csv"),
                           ("mine.csv", "sym-other/stolen.csv"), ("hard.csv", "got.csv")):  # fmt: skip
        result = _curl(box, "", "-Q", f"RNFR {source}", "-Q", f"RNTO {target}")
        planted.got(result.stdout + result.stderr)
        assert result.returncode == 21, result.stderr  # CURLE_QUOTE_ERROR: the server said no
    planted.assert_nothing_leaked_or_changed(box)
    assert (planted.home / "mine.csv").read_bytes() == MINE
