"""Downgrade attacks: old TLS, weak TLS ciphers, foreign FTPS data connections, weak SSH
algorithms, and the Terrapin countermeasure (strict key exchange) actually enforced.

A refusal only counts when it comes from the server: each negative probe has a positive
twin of the same shape that succeeds, and the client's own offer is checked to be non-empty
(this OpenSSL build has no RC4, DES or 3DES at all, so ``-cipher RC4:DES:3DES`` alone would
fail on the client side and prove nothing).  What the local client cannot offer is covered
by the server's own cipher list, read from a connection object of its TLS context.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import shutil
import socket
import ssl
import subprocess
import warnings
from typing import Any

import asyncssh
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from OpenSSL import SSL

from .attack_harness import LOCAL, DropBox, can_bind
from .conftest import VENDOR, VENDOR_PASSWORD
from .test_sftp import run, server_kexinit

OPENSSL = shutil.which("openssl")
SSH = shutil.which("ssh")
INTRUDER = "127.0.0.2"
ALLOWED_TLS12 = {  # the server's whole TLS 1.2 list (fileserver.ftps.TLS12_CIPHERS)
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13 = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}


# -- TLS (FTPS) --------------------------------------------------------------------------
def s_client(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-starttls", "ftp", "-connect", f"{LOCAL}:{port}", *options],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def client_offer(cipher_list: str) -> list[str]:
    """The TLS 1.2 suites the local OpenSSL would offer for ``cipher_list`` (may be none)."""
    assert OPENSSL is not None
    listed = subprocess.run(
        [OPENSSL, "ciphers", "-s", "-tls1_2", cipher_list], capture_output=True, text=True, check=False
    )
    return listed.stdout.strip().split(":") if listed.returncode == 0 and listed.stdout.strip() else []


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_s_client_old_protocols_and_weak_ciphers_are_refused(box: DropBox) -> None:
    port = box.ftps_port
    for version in ("-tls1_2", "-tls1_3"):
        accepted = s_client(port, version)
        assert accepted.returncode == 0, accepted.stderr
        protocol = "TLSv1.2" if version == "-tls1_2" else "TLSv1.3"
        assert f"Protocol  : {protocol}" in accepted.stdout or f"New, {protocol}" in accepted.stdout
    # SECLEVEL=0: the local OpenSSL would speak TLS 1.0/1.1; it is the server that says no.
    for version in ("-tls1", "-tls1_1"):
        refused = s_client(port, version, "-cipher", "DEFAULT@SECLEVEL=0")
        assert refused.returncode != 0 and "alert protocol version" in refused.stderr, refused.stderr

    families = {
        "RC4:DES:3DES:NULL:EXPORT:aNULL": "the issue's list",
        "NULL:eNULL": "no encryption",
        "aNULL": "anonymous (no authentication)",
        "kRSA": "static RSA key exchange (no forward secrecy)",
        "kDHE": "finite-field DHE",
        "CBC": "CBC mode (Lucky13, padding oracles)",
        "SHA1": "SHA-1 MACs",
        "CAMELLIA:ARIA:SEED:IDEA": "legacy block ciphers",
        f"ALL:COMPLEMENTOFALL:!{':!'.join(sorted(ALLOWED_TLS12))}": "everything but the allowed six",
    }
    for cipher_list, what in families.items():
        offered = client_offer(f"{cipher_list}@SECLEVEL=0")
        assert offered, f"the local OpenSSL offers nothing for {what}: the probe would prove nothing"
        assert not set(offered) & ALLOWED_TLS12
        refused = s_client(port, "-tls1_2", "-cipher", f"{cipher_list}@SECLEVEL=0")
        assert refused.returncode != 0 and "alert handshake failure" in refused.stderr, (what, refused.stdout)
    for allowed in sorted(name for name in ALLOWED_TLS12 if "-RSA-" in name):  # the certificate is RSA
        accepted = s_client(port, "-tls1_2", "-cipher", f"{allowed}@SECLEVEL=0")
        assert accepted.returncode == 0 and f"Cipher is {allowed}" in accepted.stdout, allowed


def test_server_tls_context_enables_only_forward_secret_aead_suites(box: DropBox) -> None:
    """What no local client can offer (RC4, DES, 3DES, EXPORT here) is checked on the server's side."""
    connection = SSL.Connection(box.ftps.new_tls_context(), None)
    enabled = set(connection.get_cipher_list())
    assert enabled == ALLOWED_TLS12 | TLS13, enabled - ALLOWED_TLS12 - TLS13
    for weak in ("RC4", "DES", "3DES", "NULL", "EXP", "ADH", "AECDH", "MD5", "PSK", "SRP", "CBC"):
        assert not [name for name in enabled if weak in name.split("-")], weak


def test_tls_1_1_on_the_data_connection_is_refused(box: DropBox) -> None:
    """The control connection is fine (TLS 1.3); the data connection tries TLS 1.1."""
    ftp = box.ftps_login()
    try:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT@SECLEVEL=0")
        ftp.sendcmd("TYPE I")
        _, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert ftp.sendcmd("STOR downgraded.csv").startswith("150")
        with (
            socket.create_connection((LOCAL, port), timeout=20) as raw,
            pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"),
        ):
            old.wrap_socket(raw).sendall(b"sent over TLS 1.1\n")
        with pytest.raises(ftplib.error_perm, match=r"^522"):  # RFC 4217 10.2: handshake failed
            ftp.getresp()
        ftp.storbinary("STOR fine.csv", io.BytesIO(b"over TLS 1.2+\n"))  # the session goes on
    finally:
        ftp.close()
    assert not (box.users.home(VENDOR) / "downgraded.csv").exists()
    assert not [p for p in box.users.home(VENDOR).iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not can_bind(INTRUDER), reason="cannot bind 127.0.0.2 on this machine")
@pytest.mark.parametrize("command", ["STOR", "RETR"])
def test_data_connection_from_another_address_gets_nothing_and_stores_nothing(
    box: DropBox, command: str
) -> None:
    """An intruder races the client to its passive port from 127.0.0.2 (FTP bounce/port theft):
    it is dropped before any byte of the file moves, and the client's transfer still works."""
    home = box.users.home(VENDOR)
    (home / "mine.csv").write_bytes(b"device,energy\nonly-for-the-vendor,1\n")
    ftp = box.ftps_login()
    try:
        ftp.sendcmd("TYPE I")
        _, port = ftplib.parse227(ftp.sendcmd("PASV"))
        name = "mine.csv" if command == "RETR" else "upload.csv"
        assert ftp.sendcmd(f"{command} {name}").startswith("150")  # waits for the data connection
        stolen = b""
        with socket.create_connection((LOCAL, port), timeout=20, source_address=(INTRUDER, 0)) as intruder:
            with pytest.raises(
                ftplib.error_temp, match=r"^425 Rejected data connection from foreign address"
            ):
                ftp.getresp()
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
            with contextlib.suppress(OSError):
                stream = tls.wrap_socket(intruder)  # the server closed it: the handshake fails
                stream.sendall(b"INTRUDER DATA\n")
                while chunk := stream.recv(65536):
                    stolen += chunk
        assert stolen == b""
        # The listener is still the client's: its own data connection goes through.
        assert ftp.context is not None
        with ftp.context.wrap_socket(socket.create_connection((LOCAL, port), timeout=20),
                                     server_hostname=LOCAL) as data:  # fmt: skip
            if command == "STOR":
                data.sendall(b"from the client\n")
                data.unwrap()
            else:
                received = b""
                while chunk := data.recv(65536):
                    received += chunk
                assert received == (home / "mine.csv").read_bytes()
        assert ftp.voidresp().startswith("226")
        ftp.quit()
    finally:
        ftp.close()
    if command == "STOR":
        assert (home / "upload.csv").read_bytes() == b"from the client\n"
        assert box.ftps_published == [home / "upload.csv"]


# -- SSH ---------------------------------------------------------------------------------
WEAK_SSH_OFFERS: dict[str, dict[str, Any]] = {
    "kex diffie-hellman-group1-sha1": {"kex_algs": ["diffie-hellman-group1-sha1"]},
    "kex diffie-hellman-group14-sha1": {"kex_algs": ["diffie-hellman-group14-sha1"]},
    "kex diffie-hellman-group-exchange-sha1": {"kex_algs": ["diffie-hellman-group-exchange-sha1"]},
    "kex rsa1024-sha1": {"kex_algs": ["rsa1024-sha1"]},
    "host key ssh-rsa (SHA-1)": {"server_host_key_algs": ["ssh-rsa"]},
    "host key ssh-dss": {"server_host_key_algs": ["ssh-dss"]},
    "cipher 3des-cbc": {"encryption_algs": ["3des-cbc"]},
    "cipher aes128-cbc": {"encryption_algs": ["aes128-cbc"]},
    "cipher arcfour": {"encryption_algs": ["arcfour", "arcfour128", "arcfour256"]},
    "cipher blowfish-cbc": {"encryption_algs": ["blowfish-cbc"]},
    "mac hmac-md5": {"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-md5", "hmac-md5-96"]},
    "mac hmac-sha1": {"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha1", "hmac-sha1-96"]},
    "mac hmac-sha1-etm": {"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha1-etm@openssh.com"]},
    "mac umac-64": {"encryption_algs": ["aes128-ctr"], "mac_algs": ["umac-64@openssh.com"]},
    "all of the above at once": {
        "kex_algs": ["diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1"],
        "server_host_key_algs": ["ssh-rsa", "ssh-dss"],
        "encryption_algs": ["3des-cbc", "aes128-cbc"],
        "mac_algs": ["hmac-md5", "hmac-sha1"],
    },
}


def test_asyncssh_offering_only_weak_algorithms_is_refused(box: DropBox) -> None:
    async def attempt(options: dict[str, Any]) -> None:
        async with box.sftp_connect(**options):
            pass

    for what, options in WEAK_SSH_OFFERS.items():
        # The password is right: had the key exchange succeeded, the login would have too.
        # Refused means KeyExchangeFailed (or the connection dropped mid-exchange, when the
        # server's disconnect overtakes the client's own verdict); asyncssh raises ValueError
        # for an algorithm it cannot offer, so every offer here really was made.
        try:
            run(attempt(options))
        except (asyncssh.KeyExchangeFailed, asyncssh.ConnectionLost):
            continue
        except Exception as error:
            pytest.fail(f"{what}: {error!r} instead of a failed key exchange")
        pytest.fail(f"{what}: accepted")
    run(attempt({"kex_algs": ["curve25519-sha256"], "encryption_algs": ["aes128-ctr"],
                 "mac_algs": ["hmac-sha2-256-etm@openssh.com"]}))  # fmt: skip


def openssh(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    assert SSH is not None
    return subprocess.run(
        [SSH, "-F", "/dev/null", "-vvv", "-oBatchMode=yes", "-oStrictHostKeyChecking=no",
         "-oUserKnownHostsFile=/dev/null", "-oIdentitiesOnly=yes", "-oIdentityAgent=none", *options,
         "-p", str(port), f"{VENDOR}@{LOCAL}", "true"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def their_offer(stderr: str, what: str) -> list[str]:
    for line in stderr.splitlines():
        if f"no matching {what} found. Their offer: " in line:
            return line.split("Their offer: ", 1)[1].strip().split(",")
    pytest.fail(f"ssh did not report a {what} mismatch:\n{stderr[-2000:]}")


def _weak(name: str) -> bool:
    return any(mark in name for mark in ("sha1", "md5", "cbc", "3des", "arcfour", "umac-64", "group1-", "ssh-rsa",
                                         "ssh-dss", "rsa1024"))  # fmt: skip


@pytest.mark.skipif(SSH is None, reason="OpenSSH client not installed")
def test_openssh_client_offering_weak_algorithms_is_refused(box: DropBox) -> None:
    port = box.sftp_port
    cases = [
        (("-oKexAlgorithms=diffie-hellman-group1-sha1,diffie-hellman-group14-sha1",), "key exchange method"),
        (("-oHostKeyAlgorithms=ssh-rsa,ssh-dss",), "host key type"),
        (("-oCiphers=3des-cbc,aes128-cbc,aes256-cbc",), "cipher"),
        (
            (
                "-oCiphers=aes128-ctr",
                "-oMACs=hmac-md5,hmac-sha1,hmac-sha1-etm@openssh.com,umac-64@openssh.com",
            ),
            "MAC",
        ),
    ]
    for options, what in cases:
        result = openssh(port, *options)
        assert result.returncode == 255
        offer = their_offer(result.stderr, what)
        assert offer and not [name for name in offer if _weak(name)], offer
        if what == "key exchange method":
            assert "kex-strict-s-v00@openssh.com" in offer
    # The default client negotiates modern algorithms and strict key exchange.
    modern = openssh(port)
    assert "kex_choose_conf: will use strict KEX ordering" in modern.stderr, modern.stderr[-2000:]
    assert "kex: algorithm: sha1" not in modern.stderr


def test_server_kexinit_offers_no_weak_algorithm_and_strict_kex(box: DropBox) -> None:
    offered = server_kexinit(box.sftp_port)
    print({name: ",".join(algs) for name, algs in offered.items()})
    assert "kex-strict-s-v00@openssh.com" in offered["kex"]
    for name, algs in offered.items():
        weak = [alg for alg in algs if _weak(alg)]
        assert weak == [], (name, weak)
    assert set(offered["host_key"]) == {"ssh-ed25519", "rsa-sha2-256", "rsa-sha2-512"}


# -- strict kex, enforced: a raw Terrapin-style probe ----------------------------------
def _packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 6): length, padding length, payload, padding."""
    padding = 8 - (len(payload) + 5) % 8
    padding += 8 if padding < 4 else 0
    return (len(payload) + padding + 1).to_bytes(4, "big") + bytes([padding]) + payload + os.urandom(padding)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _kexinit(strict: bool) -> bytes:
    kex = b"curve25519-sha256" + (b",kex-strict-c-v00@openssh.com" if strict else b"")
    lists = [kex, b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256",
             b"none", b"none", b"", b""]  # fmt: skip
    return bytes([20]) + os.urandom(16) + b"".join(_string(x) for x in lists) + b"\x00" + bytes(4)


def _read_packet(stream: Any) -> tuple[int, bytes]:
    length = int.from_bytes(stream.read(4), "big")
    body = stream.read(length)
    assert len(body) == length, "connection closed"
    payload = body[1 : length - body[0]]
    return payload[0], payload


def terrapin_probe(port: int, *, strict: bool, ignore_first: bool) -> tuple[int, bytes]:
    """Open a key exchange the way a Terrapin attacker's victim would see it: an
    SSH_MSG_IGNORE slipped in before the client's KEXINIT (``ignore_first``).  Returns the
    server's reply to the key exchange: 31 (KEX_ECDH_REPLY, it went on) or 1 (DISCONNECT)."""
    with socket.create_connection((LOCAL, port), timeout=20) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"SSH-2.0-meterdrop_terrapin_probe\r\n")
        while not stream.readline().startswith(b"SSH-2.0-"):
            pass
        kind, _ = _read_packet(stream)
        assert kind == 20  # the server's KEXINIT
        if ignore_first:
            sock.sendall(_packet(bytes([2]) + _string(b"injected")))  # SSH_MSG_IGNORE
        client_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
        sock.sendall(_packet(_kexinit(strict)) + _packet(bytes([30]) + _string(client_key)))
        while True:
            kind, payload = _read_packet(stream)
            if kind in (1, 31):
                return kind, payload


def test_strict_kex_is_enforced_not_just_advertised(box: DropBox) -> None:
    port = box.sftp_port
    # With strict kex, a packet before KEXINIT (what Terrapin injects) ends the connection ...
    kind, payload = terrapin_probe(port, strict=True, ignore_first=True)
    assert kind == 1, "the server went on with the key exchange after an injected packet"
    assert b"Strict key exchange violation" in payload
    # ... while the same key exchange without the injected packet goes on (KEX_ECDH_REPLY),
    kind, _ = terrapin_probe(port, strict=True, ignore_first=False)
    assert kind == 31
    # ... and so does a client without strict kex, for which the packet is legal.
    kind, _ = terrapin_probe(port, strict=False, ignore_first=True)
    assert kind == 31

    async def login() -> None:  # a normal client is unaffected
        async with box.sftp_connect(password=VENDOR_PASSWORD) as conn, conn.start_sftp_client() as sftp:
            await sftp.listdir("/")

    run(login())
