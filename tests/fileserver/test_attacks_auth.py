"""Password attacks on both protocols: brute force is banned per address, users cannot be enumerated.

Both servers run as `meterdrop serve` runs them: one user store, one guard.  Attackers are
clients bound to addresses in 127.0.0.0/8 (Linux routes the whole block to ``lo``), the
servers listen on 127.0.0.1, so every source address is a distinct client to the guard.
Thresholds are small (3-4 failures) so the tests are fast; the production defaults only
change the numbers.

User enumeration: an unknown user, a known user with a wrong password and a key-only user
(no password at all) must get the same replies and take the same time.  argon2id takes
0.1-0.4 s here; a server that skips it for names it does not know answers those in
about a millisecond.  The timing test measures failed attempts for the three kinds of
name side by side (concurrently, so that the load of a shared machine hits all three
alike) and compares medians; a canary run against a deliberately leaky password check
shows the same measurement does catch the leak.
"""

from __future__ import annotations

import asyncio
import ftplib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
import paramiko
import pytest

from fileserver.guard import Guard, GuardPolicy
from fileserver.users import UserStore
from tests.conftest import eventually

from .attack_harness import LOCAL, DropBox, can_bind
from .conftest import VENDOR, VENDOR_PASSWORD
from .test_sftp import keygen, run

KEY_ONLY = "panel"  # a user with a public key and no password
UNKNOWN = "nobody"
SPREAD = ("127.0.0.2", "127.0.1.3", "127.1.2.3", "127.45.67.89", "127.200.10.20", "127.255.255.254")

pytestmark = pytest.mark.skipif(
    not all(can_bind(address) for address in (*SPREAD, "127.0.0.9")),
    reason="this machine does not route 127.0.0.0/8 to lo",  # Linux always does
)


@pytest.fixture
def start_box(users: UserStore, drop_certs: Path, tmp_path: Path) -> Iterator[Callable[[Guard], DropBox]]:
    """Start SFTP + FTPS with a given guard; a key-only user exists besides vendor."""
    key = keygen(tmp_path / "panel_key", "-t", "ed25519")
    users.add(KEY_ONLY, keys=[key.with_name("panel_key.pub").read_text()])
    started: list[DropBox] = []

    def start(guard: Guard) -> DropBox:
        box = DropBox.start(users, guard, drop_certs)
        started.append(box)
        return box

    yield start
    for box in started:
        box.stop()


# -- one attempt per protocol ----------------------------------------------------------
def sftp_login(box: DropBox, source: str, password: str, user: str = VENDOR) -> str:
    """One SFTP password login from ``source``: "ok", "denied" (wrong password) or "refused"."""

    async def attempt() -> str:
        try:
            async with box.sftp_connect(source, user=user, password=password) as conn:
                async with conn.start_sftp_client() as sftp:
                    await sftp.listdir("/")
                return "ok"
        except asyncssh.PermissionDenied:
            return "denied"
        except (asyncssh.Error, OSError):  # dropped before or during the handshake: banned
            return "refused"

    result: str = run(attempt())
    return result


def ftps_login(box: DropBox, source: str, password: str, user: str = VENDOR) -> str:
    """One FTPS login from ``source``: "ok", "denied" (530) or "refused" (421, dropped)."""
    try:
        ftp = box.ftps_connect(source)
    except ftplib.error_temp as error:
        assert str(error).startswith("421 Too many failed logins"), error
        return "refused"
    try:
        ftp.login(user, password)
        ftp.prot_p()
        ftp.sendcmd("PWD")
        return "ok"
    except ftplib.error_perm as error:  # the attempt that earns the ban is still a 530
        assert str(error).startswith("530"), error
        return "denied"
    except ftplib.error_temp as error:
        assert str(error).startswith("421 Too many failed logins"), error
        return "refused"
    finally:
        ftp.close()


LOGIN = {"sftp": sftp_login, "ftps": ftps_login}


def small_guard(max_failures: int, ban_seconds: float = 300.0) -> Guard:
    return Guard(
        GuardPolicy(
            max_failures=max_failures,
            window=300.0,
            ban_seconds=ban_seconds,
            delay_per_failure=0.01,
            max_delay=0.05,
        )
    )


# -- brute force -----------------------------------------------------------------------
@pytest.mark.parametrize("attacker", ["sftp", "ftps"])
def test_brute_force_from_one_address_is_banned_on_both_protocols(
    start_box: Callable[[Guard], DropBox], caplog: pytest.LogCaptureFixture, attacker: str
) -> None:
    guard = small_guard(max_failures=4)
    box = start_box(guard)
    source = "127.0.0.2"
    caplog.set_level(logging.WARNING, logger="meterdrop")
    attempts = 0
    while not guard.is_banned(source):
        attempts += 1
        assert attempts <= 20, "never banned"
        assert LOGIN[attacker](box, source, f"guess-{attempts}") in ("denied", "refused")
    print(f"{attacker}: banned after {attempts} failed logins (policy: {guard.policy.max_failures})")
    assert attempts == guard.policy.max_failures
    # The right password no longer helps, on either protocol; other addresses are unaffected.
    for protocol, login in LOGIN.items():
        assert login(box, source, VENDOR_PASSWORD) == "refused", protocol
        assert login(box, LOCAL, VENDOR_PASSWORD) == "ok", protocol
    assert any(f"banned {source} for 300 s after 4 failed logins" in r.getMessage() for r in caplog.records)
    assert box.published == []


def test_brute_force_spread_over_loopback_addresses_bans_each_one(
    start_box: Callable[[Guard], DropBox], caplog: pytest.LogCaptureFixture
) -> None:
    """One failure per address per round, protocols alternating: every address that reaches
    the threshold is banned on its own, the others (and bystanders) keep working."""
    guard = small_guard(max_failures=3)
    box = start_box(guard)
    caplog.set_level(logging.WARNING, logger="meterdrop.guard")
    protocols = list(LOGIN)
    rounds = guard.policy.max_failures
    for round_ in range(rounds):
        for index, source in enumerate(SPREAD):
            protocol = protocols[(index + round_) % 2]
            assert LOGIN[protocol](box, source, f"guess-{round_}") == "denied", (source, round_)
        banned = [source for source in SPREAD if guard.is_banned(source)]
        if round_ < rounds - 1:
            assert banned == [], f"banned after {round_ + 1} failures: {banned}"
        else:
            assert banned == list(SPREAD)
    # A bystander with fewer failures than the threshold is not banned, and logs in.
    for protocol, login in LOGIN.items():
        assert login(box, "127.0.0.9", "one wrong guess") == "denied", protocol
    assert not guard.is_banned("127.0.0.9")
    for protocol, login in LOGIN.items():
        assert login(box, "127.0.0.9", VENDOR_PASSWORD) == "ok", protocol
        assert login(box, LOCAL, VENDOR_PASSWORD) == "ok", protocol
        for source in SPREAD:
            assert login(box, source, VENDOR_PASSWORD) == "refused", (protocol, source)
    bans = sorted(r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("banned "))
    assert bans == sorted(SPREAD)
    print(f"{len(SPREAD)} addresses, each banned after {rounds} failures; bystander not banned")


def test_a_ban_ends_after_ban_time(start_box: Callable[[Guard], DropBox]) -> None:
    guard = small_guard(max_failures=2, ban_seconds=1.5)
    box = start_box(guard)
    source = "127.0.0.3"
    for attempt in range(2):
        assert sftp_login(box, source, f"guess-{attempt}") == "denied"
    banned_at = time.monotonic()
    assert sftp_login(box, source, VENDOR_PASSWORD) == "refused"
    eventually(lambda: ftps_login(box, source, VENDOR_PASSWORD) == "ok", "the ban to end", timeout=20)
    waited = time.monotonic() - banned_at
    assert waited >= 1.5 - 0.05
    assert sftp_login(box, source, VENDOR_PASSWORD) == "ok"
    print(f"ban of 1.5 s lifted after {waited:.2f} s")


# -- user enumeration: replies ----------------------------------------------------------
def test_replies_do_not_tell_unknown_users_from_wrong_passwords(
    start_box: Callable[[Guard], DropBox],
) -> None:
    box = start_box(small_guard(max_failures=1000))
    # SSH: the methods offered ("none" request) and the failure for a wrong password.
    offered = {}
    for user in (UNKNOWN, VENDOR, KEY_ONLY):
        transport = box.paramiko_transport()
        try:
            with pytest.raises(paramiko.BadAuthenticationType) as none:
                transport.auth_none(user)
            offered[user] = none.value.allowed_types
        finally:
            transport.close()
    assert offered[UNKNOWN] == offered[VENDOR] == offered[KEY_ONLY] == ["publickey", "password"]

    async def sftp_failure(user: str) -> tuple[int, str]:
        with pytest.raises(asyncssh.PermissionDenied) as denied:
            async with box.sftp_connect(user=user, password="wrong-password"):
                pass
        return denied.value.code, denied.value.reason.replace(user, "USER")

    failures = {user: run(sftp_failure(user)) for user in (UNKNOWN, VENDOR, KEY_ONLY)}
    assert failures[UNKNOWN] == failures[VENDOR] == failures[KEY_ONLY]

    # FTPS: the USER and PASS replies, word for word.
    replies = {}
    for user in (UNKNOWN, VENDOR, KEY_ONLY):
        ftp = box.ftps_connect()
        try:
            ftp.auth()
            user_reply = ftp.sendcmd(f"USER {user}")
            with pytest.raises(ftplib.error_perm) as denied:
                ftp.sendcmd("PASS wrong-password")
            replies[user] = (user_reply, str(denied.value))
        finally:
            ftp.close()
    assert replies[UNKNOWN] == replies[VENDOR] == replies[KEY_ONLY]
    assert replies[VENDOR] == ("331 Username ok, send password.", "530 Login incorrect.")


# -- user enumeration: timing -----------------------------------------------------------
class _PasswordProber(asyncssh.SSHClient):
    """Offers ``attempts`` wrong passwords on one connection and times each answer."""

    def __init__(self, attempts: int) -> None:
        self.left, self.sent = attempts, 0.0
        self.times: list[float] = []

    def password_auth_requested(self) -> str | None:
        now = time.perf_counter()
        if self.sent:
            self.times.append(now - self.sent)  # the server's answer to the previous one
        if not self.left:
            return None
        self.left -= 1
        self.sent = time.perf_counter()
        return "wrong-password"


async def _sftp_times(box: DropBox, user: str, attempts: int) -> list[float]:
    prober = _PasswordProber(attempts)
    with pytest.raises(asyncssh.PermissionDenied):
        async with box.sftp_connect(user=user, password=None, client_factory=lambda: prober):
            pass
    assert len(prober.times) == attempts
    return prober.times


def _ftps_times(box: DropBox, user: str, attempts: int) -> list[float]:
    ftp = box.ftps_connect()
    times = []
    try:
        ftp.auth()
        for _ in range(attempts):  # pyftpdlib disconnects after its third failure
            ftp.sendcmd(f"USER {user}")
            started = time.perf_counter()
            with pytest.raises(ftplib.error_perm):
                ftp.sendcmd("PASS wrong-password")
            times.append(time.perf_counter() - started)
    finally:
        ftp.close()
    return times


def measure(protocol: str, box: DropBox, rounds: int) -> dict[str, list[float]]:
    """Per round, the median answer time to a wrong password for each kind of user name.

    The three kinds are measured concurrently within a round, so that whatever else the
    machine does at that moment slows them alike.
    """
    users = (UNKNOWN, VENDOR, KEY_ONLY)
    medians: dict[str, list[float]] = {user: [] for user in users}
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        for _ in range(rounds):
            if protocol == "sftp":

                async def together() -> list[list[float]]:
                    return list(await asyncio.gather(*(_sftp_times(box, user, 2) for user in users)))

                results = run(together())
            else:
                results = list(pool.map(lambda user: _ftps_times(box, user, 2), users))
            for user, times in zip(users, results, strict=True):
                medians[user].append(statistics.median(times))
    return medians


def leak(medians: dict[str, list[float]], user: str) -> float:
    """Median over rounds of (this kind's time - the known user's time), in seconds."""
    return statistics.median(a - b for a, b in zip(medians[user], medians[VENDOR], strict=True))


@pytest.mark.parametrize("protocol", ["sftp", "ftps"])
def test_unknown_users_take_as_long_as_wrong_passwords(
    start_box: Callable[[Guard], DropBox], users: UserStore, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    box = start_box(Guard(GuardPolicy(max_failures=10_000, delay_per_failure=0.0, max_delay=0.0)))
    medians = measure(protocol, box, rounds=6)
    known = statistics.median(medians[VENDOR])
    tolerance = 0.5 * known  # a skipped argon2 makes the difference about 1.0 * known
    figures = {user: round(statistics.median(times) * 1000, 1) for user, times in medians.items()}
    print(f"{protocol}: median ms per failed login {figures}; tolerance {tolerance * 1000:.0f} ms")
    assert abs(leak(medians, UNKNOWN)) <= tolerance, figures
    assert abs(leak(medians, KEY_ONLY)) <= tolerance, figures

    # Canary: the same measurement against the classic bug (no hash check for unknown
    # names) must see it, or the assertions above prove nothing.
    honest = users.verify_password

    def leaky(name: str, password: str) -> bool:
        return users.get(name) is not None and honest(name, password)

    monkeypatch.setattr(users, "verify_password", leaky)
    leaky_medians = measure(protocol, box, rounds=4)
    leaked = leak(leaky_medians, UNKNOWN)
    print(f"{protocol}: canary (leaky check) unknown - known = {leaked * 1000:.0f} ms")
    assert leaked < -0.5 * statistics.median(leaky_medians[VENDOR])
