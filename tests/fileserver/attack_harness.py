"""Both drop servers at once, as `meterdrop serve` runs them, for the attack tests.

`meterdrop serve` starts the SFTP and the FTPS server on one :class:`UserStore` and one
:class:`Guard`, so a ban earned on one protocol holds on the other, and a path refused on
one must be refused on the other.  The attack tests need exactly that composition, with
clients that can choose their source address in 127.0.0.0/8 (Linux routes all of it to
``lo``), so this module starts both servers and opens clients bound to a given address.

The single-protocol harnesses (``SFTPServerThread``, the FTPS client helpers) are reused
from the protocol test modules rather than copied.
"""

from __future__ import annotations

import ftplib
import hashlib
import os
import socket
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paramiko

from fileserver.ftps import FtpsServer
from fileserver.guard import Guard
from fileserver.users import UserStore

from .conftest import VENDOR, VENDOR_PASSWORD
from .test_ftps import client_context, free_port_range
from .test_sftp import SFTPServerThread

LOCAL = "127.0.0.1"


@dataclass
class DropBox:
    """A running SFTP + FTPS pair sharing users and guard; what each published is recorded."""

    users: UserStore
    guard: Guard
    certs: Path
    sftp: SFTPServerThread
    ftps: FtpsServer
    ftps_published: list[Path] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        users: UserStore,
        guard: Guard,
        certs: Path,
        *,
        sftp_options: dict[str, Any] | None = None,
        ftps_options: dict[str, Any] | None = None,
    ) -> DropBox:
        sftp = SFTPServerThread(users, guard, certs, **(sftp_options or {}))
        published: list[Path] = []
        try:
            ftps = FtpsServer(
                host=LOCAL,
                port=0,
                passive_ports=free_port_range(4),
                users=users,
                guard=guard,
                certs_dir=certs,
                on_published=published.append,
                **(ftps_options or {}),
            )
        except BaseException:
            sftp.stop()
            raise
        ftps.start()
        return cls(users, guard, certs, sftp, ftps, published)

    def stop(self) -> None:
        self.ftps.stop()
        self.sftp.stop()

    @property
    def sftp_port(self) -> int:
        return self.sftp.port

    @property
    def ftps_port(self) -> int:
        return self.ftps.address[1]

    @property
    def published(self) -> list[Path]:
        """Everything either server announced as complete, in order per server."""
        return [*self.sftp.published, *self.ftps_published]

    # -- clients ------------------------------------------------------------------------
    def sftp_connect(
        self, source: str = LOCAL, user: str = VENDOR, password: str | None = VENDOR_PASSWORD, **options: Any
    ) -> Any:
        """An asyncssh connection (an awaitable/async context manager) from ``source``."""
        settings: dict[str, Any] = {
            "username": user,
            "password": password,
            "known_hosts": None,
            "client_keys": None,
            "agent_path": None,
            "config": None,
            "connect_timeout": 20,
            "local_addr": (source, 0),
        }
        settings.update(options)
        return asyncssh.connect(LOCAL, self.sftp_port, **settings)

    def paramiko_transport(self, source: str = LOCAL) -> paramiko.Transport:
        """A started (key exchange done, not authenticated) paramiko transport from ``source``."""
        sock = socket.create_connection((LOCAL, self.sftp_port), timeout=20, source_address=(source, 0))
        transport = paramiko.Transport(sock)
        transport.start_client(timeout=20)
        return transport

    def ftps_connect(self, source: str = LOCAL, *, timeout: float = 20) -> ftplib.FTP_TLS:
        """An FTP_TLS client from ``source`` (data connections too), connected, TLS not yet on."""
        ftp = ftplib.FTP_TLS(context=client_context(self.certs), timeout=timeout, source_address=(source, 0))
        ftp.connect(LOCAL, self.ftps_port)
        return ftp

    def ftps_login(
        self, source: str = LOCAL, user: str = VENDOR, password: str = VENDOR_PASSWORD
    ) -> ftplib.FTP_TLS:
        ftp = self.ftps_connect(source)
        ftp.login(user, password)
        ftp.prot_p()
        return ftp


def ftps_listing(ftp: ftplib.FTP_TLS, command: str) -> bytes:
    """The raw bytes of a listing (``LIST``/``NLST``/``MLSD`` ...) in binary type."""
    ftp.sendcmd("TYPE I")
    chunks: list[bytes] = []
    ftp.retrbinary(command, chunks.append)
    return b"".join(chunks)


def can_bind(address: str) -> bool:
    """Whether this machine lets a socket bind ``address`` (Linux: all of 127.0.0.0/8)."""
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


# -- what the attacks must not touch ---------------------------------------------------
def tree_state(root: Path, skip: Iterable[Path] = ()) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (but not under ``skip``): kind, size, mtime, content hash.

    Taken before and after an attack, equality means nothing outside the user's folder was
    created, changed, renamed or removed (a symlink's target is recorded, not followed).
    """
    skipped = set(skip)  # the same spelling as ``root``'s descendants: compared as written
    state: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skipped]
        for name in [*dirs, *files]:
            path = here / name
            info = os.lstat(path)
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                state[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                state[key] = ("dir", info.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[key] = ("file", info.st_size, info.st_mtime_ns, info.st_nlink, digest)
    return state


def openssh_sftp_batch(
    port: int, key: Path, commands: str, workdir: Path, user: str = VENDOR
) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH ``sftp -b`` with ``commands`` against the server (key login, no config)."""
    batch = workdir / f"batch-{os.getpid()}-{len(list(workdir.glob('batch-*')))}"
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
            f"{user}@{LOCAL}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=workdir,
    )  # fmt: skip
