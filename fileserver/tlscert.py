"""The FTPS server's certificate: the user's own pair, or a self-signed one made once and kept.

``certs/ftps.crt`` (PEM, leaf first, then any intermediates) and ``certs/ftps.key`` (PEM
private key, unencrypted).  When neither exists a self-signed RSA-2048/SHA-256 pair is
generated (the key written with mode 0600) and reused on every later start, so clients that
pinned it keep working.  Files the user put there are never touched; only one of the two
present is an error rather than a reason to overwrite anything.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_NAME = "ftps.crt"
KEY_NAME = "ftps.key"
VALID_DAYS = 3650


class CertificateError(ValueError):
    """The certificate files cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class CertificatePair:
    cert_path: Path
    key_path: Path
    chain: list[x509.Certificate]  # leaf first
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    generated: bool  # True when this call created the pair


def ensure_certificate(certs_dir: Path, hostnames: Iterable[str] = ()) -> CertificatePair:
    """Load ``ftps.crt``/``ftps.key`` from ``certs_dir``, generating a self-signed pair if both are absent."""
    cert_path, key_path = certs_dir / CERT_NAME, certs_dir / KEY_NAME
    have_cert, have_key = cert_path.exists(), key_path.exists()
    generated = False
    if not have_cert and not have_key:
        _generate(cert_path, key_path, hostnames)
        generated = True
    elif have_cert != have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise CertificateError(
            f"{present} exists but {missing} does not: put both files of your pair there, "
            "or remove the one present to have a self-signed pair generated"
        )
    chain, key = _load(cert_path, key_path)
    return CertificatePair(cert_path, key_path, chain, key, generated)


def _load(
    cert_path: Path, key_path: Path
) -> tuple[list[x509.Certificate], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]:
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except ValueError as error:
        raise CertificateError(f"{cert_path}: not a PEM certificate ({error})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(f"{key_path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path}: RSA or ECDSA key expected, found {type(key).__name__}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertificateError(f"{key_path} does not belong to the first certificate in {cert_path}")
    return chain, key


def _subject_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in [*hostnames, "localhost", socket.gethostname(), "127.0.0.1", "::1"]:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _generate(cert_path: Path, key_path: Path, hostnames: Iterable[str]) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = _subject_names(hostnames)
    common_name = next((n.value for n in names if isinstance(n, x509.DNSName)), "meterdrop")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, str(common_name)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meterdrop (self-signed)"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The key first, so a crash between the two writes leaves "key without certificate",
    # which the next start reports instead of silently pairing a new certificate with it.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
