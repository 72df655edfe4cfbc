"""The drop box's users: one set of credentials for SFTP and FTPS, as the vendor requires.

Users live in ``DATA_DIR/users.json`` (mode 0600), passwords only as argon2id hashes,
public keys as OpenSSH lines (PEM/PKCS#8 keys, which Schneider Panel Servers use, are
converted when added).  Each user's files live under ``DATA_DIR/drop/<user>/``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_HASHER = PasswordHasher()  # argon2id with the library's current recommended cost
# Verified against when the user does not exist, so unknown names cost the same time.
_DUMMY_HASH = _HASHER.hash("meterdrop: no such user")


class UserError(ValueError):
    """A user command that cannot be carried out; the message says why."""


@dataclass
class User:
    name: str
    password_hash: str | None = None
    authorized_keys: list[str] = field(default_factory=list)


def public_key_line(text: str) -> str:
    """One public key in OpenSSH format, from OpenSSH, RFC 4716 or PEM/PKCS#8 text."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as error:
        raise UserError(f"not a public key (OpenSSH or PEM expected): {error}") from None
    return key.export_public_key("openssh").decode().strip()


class UserStore:
    """Reads and writes ``users.json``; safe to share between the two servers' threads."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "users.json"
        self.drop_root = data_dir / "drop"
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------
    def _load(self) -> dict[str, User]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        return {
            name: User(name, entry.get("password_hash"), list(entry.get("authorized_keys", [])))
            for name, entry in raw.get("users", {}).items()
        }

    def everyone(self) -> list[User]:
        return sorted(self._load().values(), key=lambda u: u.name)

    def get(self, name: str) -> User | None:
        return self._load().get(name)

    def home(self, name: str) -> Path:
        """The user's drop folder, created on demand; everything they do stays inside it."""
        folder = self.drop_root / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def verify_password(self, name: str, password: str) -> bool:
        """True when the password is right; costs one argon2 verification either way."""
        user = self.get(name)
        stored = user.password_hash if user and user.password_hash else None
        try:
            return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    def authorized_keys(self, name: str) -> list[str]:
        user = self.get(name)
        return list(user.authorized_keys) if user else []

    # -- changing -----------------------------------------------------------------------
    def _save(self, users: dict[str, User]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "users": {
                u.name: {"password_hash": u.password_hash, "authorized_keys": u.authorized_keys}
                for u in sorted(users.values(), key=lambda u: u.name)
            }
        }
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".users.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, name: str, password: str | None = None, keys: list[str] | None = None) -> User:
        if not NAME.match(name):
            raise UserError(
                f"invalid user name {name!r}: use 1-32 of a-z, 0-9, '_', '.', '-', starting with a letter or '_'"
            )
        if not password and not keys:
            raise UserError("a user needs a password (--password-stdin) or a public key (--authorized-key)")
        with self._lock:
            users = self._load()
            if name in users:
                raise UserError(f"user {name!r} exists: use `meterdrop users passwd {name}` to change it")
            user = User(
                name, _HASHER.hash(password) if password else None, [public_key_line(k) for k in keys or []]
            )
            users[name] = user
            self._save(users)
        self.home(name)
        return user

    def set_password(self, name: str, password: str) -> None:
        if not password:
            raise UserError("empty password")
        with self._lock:
            users = self._load()
            if name not in users:
                raise UserError(f"no user {name!r}: see `meterdrop users list`")
            users[name].password_hash = _HASHER.hash(password)
            self._save(users)

    def remove(self, name: str) -> None:
        """Forget the user; their drop folder and the data already ingested stay."""
        with self._lock:
            users = self._load()
            if users.pop(name, None) is None:
                raise UserError(f"no user {name!r}: see `meterdrop users list`")
            self._save(users)
