"""Users, brute-force guard and path confinement: the pieces both servers share."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fileserver.drops import Refused, inside, partial_for, publish
from fileserver.guard import Guard, GuardPolicy
from fileserver.users import UserError, UserStore


def meterdrop(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], input=stdin, capture_output=True, text=True,
                          check=False)  # fmt: skip


def test_users_commands_store_only_argon2_hashes(tmp_path: Path) -> None:
    data = str(tmp_path)
    added = meterdrop("users", "add", "acme", "--password-stdin", "--data-dir", data, stdin="correct horse\n")
    assert added.returncode == 0, added.stderr
    text = (tmp_path / "users.json").read_text()
    assert "correct horse" not in text
    assert json.loads(text)["users"]["acme"]["password_hash"].startswith("$argon2id$")
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    assert (tmp_path / "drop" / "acme").is_dir()
    store = UserStore(tmp_path)
    assert store.verify_password("acme", "correct horse")
    assert not store.verify_password("acme", "wrong")
    assert not store.verify_password("nobody", "correct horse")

    again = meterdrop("users", "add", "acme", "--password-stdin", "--data-dir", data, stdin="x\n")
    assert again.returncode == 1 and "user 'acme' exists" in again.stderr
    changed = meterdrop("users", "passwd", "acme", "--password-stdin", "--data-dir", data, stdin="new pass\n")
    assert changed.returncode == 0
    assert UserStore(tmp_path).verify_password("acme", "new pass")
    assert meterdrop("users", "list", "--data-dir", data).stdout == "acme\tpassword\n"
    assert meterdrop("users", "remove", "acme", "--data-dir", data).returncode == 0
    assert meterdrop("users", "list", "--data-dir", data).stdout.startswith("no users")
    assert (tmp_path / "drop" / "acme").is_dir()  # their files stay


def test_pem_public_keys_are_converted_to_openssh(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    openssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    key_file = tmp_path / "panel.pem"
    key_file.write_text(pem)
    result = meterdrop(
        "users", "add", "panel1", "--authorized-key", str(key_file), "--data-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert UserStore(tmp_path).authorized_keys("panel1") == [openssh]
    with pytest.raises(UserError, match="not a public key"):
        UserStore(tmp_path).add("bad", keys=["hello"])


@pytest.mark.parametrize("name", ["", "Root", "a/b", "../x", "x" * 40, "-dash"])
def test_bad_user_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="invalid user name"):
        UserStore(tmp_path).add(name, "pw")


def test_guard_slows_then_bans_then_forgives() -> None:
    now = [0.0]
    guard = Guard(GuardPolicy(max_failures=3, window=60, ban_seconds=100, delay_per_failure=1, max_delay=4),
                  clock=lambda: now[0])  # fmt: skip
    assert [guard.failed("10.0.0.1") for _ in range(2)] == [1, 2]
    assert not guard.is_banned("10.0.0.1")
    guard.failed("10.0.0.1")
    assert guard.is_banned("10.0.0.1")
    assert not guard.is_banned("10.0.0.2")  # per address
    now[0] = 101
    assert not guard.is_banned("10.0.0.1")
    guard.failed("10.0.0.3")
    guard.succeeded("10.0.0.3")
    assert guard.failed("10.0.0.3") == 1  # a success resets the count


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("a/b.csv", "a/b.csv"), ("/a/./b.csv", "a/b.csv"), ("../../etc/passwd", "etc/passwd"),
     ("a/../../b.csv", "b.csv"), ("%2e%2e/x", "%2e%2e/x")],
)  # fmt: skip
def test_paths_stay_inside_home(tmp_path: Path, requested: str, expected: str) -> None:
    assert inside(tmp_path, requested) == tmp_path / expected


@pytest.mark.parametrize(
    "requested",
    ["a\x00b", ".hidden", "a/.part-x", "x" * 300, "a\nb.csv", "a\r\nINFO x.csv", "a\tb", "a\x7fb"],
)
def test_hidden_nul_control_and_overlong_names_are_refused(tmp_path: Path, requested: str) -> None:
    with pytest.raises(Refused):
        inside(tmp_path, requested)


def test_a_planted_symlink_does_not_lead_out(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.symlink("/etc", home / "link")
    with pytest.raises(Refused, match="symlink"):
        inside(home, "link/passwd")


def test_publish_stamps_the_delivery_time_and_renames(tmp_path: Path) -> None:
    final = tmp_path / "export.csv"
    partial = partial_for(final)
    assert partial.name.startswith(".export.csv.part-")
    partial.write_bytes(b"data")
    os.utime(partial, (0, 0))
    publish(partial, final)
    assert final.read_bytes() == b"data" and not partial.exists()
    assert final.stat().st_mtime > 1_000_000_000
