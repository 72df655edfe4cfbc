"""The SFTP server's host keys: generated once, then reused on every start.

Vendors' export jobs pin the server's host key (known_hosts, or a fingerprint pasted
into a web form), so a key that changed on restart would stop every delivery with a
"host key changed" error.  The keys are therefore created only when missing, under
``certs_dir`` with OpenSSH's names, private parts mode 0600, and read back afterwards.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

import asyncssh

log = logging.getLogger("meterdrop.sftp")

# (file name, asyncssh algorithm, RSA key size).  Ed25519 first: it is what modern clients
# prefer; RSA (3072 bits, SHA-2 signatures only) for older embedded clients.
HOST_KEYS: tuple[tuple[str, str, int], ...] = (
    ("ssh_host_ed25519_key", "ssh-ed25519", 0),
    ("ssh_host_rsa_key", "ssh-rsa", 3072),
)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` unless it exists; True when this call created it.

    Written to a temporary name and hard-linked into place, so a crash never leaves a
    truncated key and two servers starting at once cannot replace each other's key.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask must not widen or narrow it
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_host_keys(certs_dir: Path) -> list[asyncssh.SSHKey]:
    """The host keys in ``certs_dir``, generating the missing ones (and their ``.pub``)."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    keys: list[asyncssh.SSHKey] = []
    for name, algorithm, key_size in HOST_KEYS:
        path = certs_dir / name
        if not path.exists():
            if key_size:
                key = asyncssh.generate_private_key(algorithm, key_size=key_size)
            else:
                key = asyncssh.generate_private_key(algorithm)
            if _write_new(path, key.export_private_key("openssh"), 0o600):
                log.info("generated SSH host key %s (%s)", path, key.get_fingerprint())
                pub = key.export_public_key("openssh")
                _write_new(path.with_name(name + ".pub"), pub, 0o644)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("SSH host key %s was readable by others (mode %o): set to 0600", path, mode)
            os.chmod(path, 0o600)
        keys.append(asyncssh.read_private_key(path))
    return keys
