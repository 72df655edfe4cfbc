"""The ``meterdrop`` command: the one place where the file servers and the processor meet."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click
import duckdb

from processor.ingest import Ingester, Limits, Outcome, expand
from processor.readahead import ReadAhead
from processor.store import NotADatabase, Store, held_by_another, open_store

if TYPE_CHECKING:
    from rich.console import Console

    from fileserver.users import UserStore

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _data_dir_option(f: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="METERDROP_DATA_DIR",
        default=Path("data"),
        show_default=True,
        help="Where meterdrop keeps its database, drops and users (env METERDROP_DATA_DIR).",
    )(f)


def _db_option(f: Any) -> Any:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Database file [default: DATA_DIR/meterdrop.duckdb].",
    )(f)


def _database(data_dir: Path, db: Path | None) -> Path:
    return db if db is not None else data_dir / "meterdrop.duckdb"


_DB_WAIT = 60.0
_GROUP_SECONDS = 1.0  # longest a group of small files runs before the progress bar hears of it


def _waiting(why: str) -> None:
    click.echo(f"waiting for the database, another process holds it ({why}) ...", err=True)


def _open_existing(path: Path) -> Store:
    """Open read-only; while `meterdrop serve` ingests a batch, wait for it to finish."""
    if not path.exists():
        raise click.UsageError(
            f"no database at {path}: run `meterdrop ingest PATH` first, or point --db / --data-dir at one"
        )
    return _open(
        path, read_only=True,
        held="a DuckDB CLI or notebook with the file open (close it), or `meterdrop serve` ingesting one "
             "very large file (try again when it is done)",
    )  # fmt: skip


def _open(path: Path, *, read_only: bool, held: str) -> Store:
    """Open the database, waiting while another process holds it; a clear error otherwise.

    ``held`` is what to tell the user when the wait ran out: only for a lock, since a
    file that is not a database or a folder without permission fails at once.
    """
    try:
        return open_store(path, read_only=read_only, wait=_DB_WAIT, on_wait=_waiting)
    except NotADatabase as error:
        raise click.UsageError(str(error)) from None
    except duckdb.Error as error:
        reason = str(error).strip().splitlines()[0]
        mode = "" if read_only else " for writing"
        if held_by_another(error):
            raise click.ClickException(
                f"cannot open {path}{mode}: {reason}. Another process has held it for over {_DB_WAIT:.0f}s: "
                f"{held}."
            ) from None
        raise click.ClickException(f"cannot open {path}{mode}: {reason}") from None


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="meterdrop")
def main() -> None:
    """meterdrop: a self-hosted drop box for energy data.

    Vendors' export jobs and people deliver files; meterdrop parses every complete file
    into one DuckDB database where the newest delivery of each reading wins.

    \b
    Examples:
      meterdrop ingest exports/                 load every file under exports/
      meterdrop status                          what was loaded, what was refused and why
      meterdrop query "SELECT count(*) FROM panoramic_measurements"
    """


_STYLE = {"ingested": "green", "duplicate": "cyan", "unchanged": "dim", "rejected": "bold red"}


def _outcome_lines(outcome: Outcome, indent: str = "", *, styled: bool) -> list[tuple[Outcome, str]]:
    """One line per file; a ZIP's members follow it, indented."""
    lines = [(outcome, indent + _outcome_line(outcome, styled=styled))]
    for member in outcome.members:
        lines += _outcome_lines(member, indent + "  ", styled=styled)
    return lines


def _outcome_line(outcome: Outcome, *, styled: bool) -> str:
    """The line for a terminal (rich markup: the status in colour) or, not styled, plain text."""
    if styled:
        from rich.markup import escape

        style = _STYLE[outcome.status]
        status, path = f"[{style}]{outcome.status:<9}[/{style}]", escape(outcome.path)
        detail = escape(outcome.detail) if outcome.detail else None
    else:
        status, path, detail = f"{outcome.status:<9}", outcome.path, outcome.detail
    what = f"{status} {path}"
    if outcome.status == "ingested":
        what += f"  ({outcome.format}, {outcome.rows:,} rows)"
        if detail:
            what += f"  note: {detail}"
    elif detail:
        what += f"  ({detail})" if outcome.status != "rejected" else f": {detail}"
    return what


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[..., None]]:
    """A progress bar on a terminal (stderr), updated by calling what this yields; elsewhere,
    such as a script's log, nothing, and rich's progress module is not even imported."""
    if total == 0 or not sys.stderr.isatty():
        yield lambda **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("ingesting", total=total, rate="")
        yield lambda **fields: progress.update(task, **fields)


def _any_rejected(outcome: Outcome) -> bool:
    return outcome.status == "rejected" or any(_any_rejected(m) for m in outcome.members)


def _check_zone(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"{value!r} is not an IANA time zone (e.g. America/Los_Angeles)") from None
    return value


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = value.strip().upper().removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        size = int(float(number) * units[unit])
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{value!r} is not a size like 500M or 2G") from None
    if size <= 0:
        raise click.BadParameter(f"{value!r}: a size must be above zero, like 500M or 2G")
    return size


def _max_file_size_option(f: Any) -> Any:
    return click.option(
        "--max-file-size",
        default="4G",
        show_default=True,
        callback=_size,
        help="Refuse (and ledger as rejected) any file larger than this, e.g. 500M.",
    )(f)


def _timezone_option(f: Any) -> Any:
    return click.option(
        "--timezone",
        "timezone",
        envvar="METERDROP_TIMEZONE",
        metavar="TZ",
        callback=_check_zone,
        help="IANA zone of local times in utility CSV downloads, e.g. America/New_York "
        "[default: the utility's own zone (PG&E, SCE, SDG&E: America/Los_Angeles), else the "
        "system zone; the zone used is recorded in the ledger] (env METERDROP_TIMEZONE).",
    )(f)


@main.command(context_settings=CONTEXT)
@_data_dir_option
@_db_option
@click.option("--quiet", "-q", is_flag=True, help="Print only rejected files.")
@_timezone_option
@_max_file_size_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def ingest(data_dir: Path, db: Path | None, quiet: bool, timezone: str | None, max_file_size: int,
           paths: Sequence[Path]) -> None:  # fmt: skip
    """Load files into the database, newest delivery of each reading winning.

    PATHS are files, folders (searched recursively; hidden names are skipped) or ZIPs.
    The format is detected from each file's content, never from its name: Panoramic
    Power exports (Measurements, PAN-42, Pulse Meter, Catalog), Green Button ESPI XML,
    utility CSV downloads (PG&E/Opower, PECO, PSE, Seattle City Light, Avangrid, SCE,
    SDG&E), and ZIPs of them. Each file is loaded whole or not at all and recorded in
    the `files` ledger as ingested, duplicate (same content as a file already loaded)
    or rejected with the reason; a ZIP's members are recorded as `archive.zip!member`.
    Small files are committed in groups (one transaction and one merge per table for
    up to 64 MB of them), with the same result as one by one. Files are never moved or
    deleted.

    Exit status: 0 when every file was ingested or already known, 1 when any file was
    rejected, 2 on a usage error.

    \b
    Example:
      meterdrop ingest --data-dir /srv/meterdrop exports/Measurements/
    """
    database = _database(data_dir, db)
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.ClickException(
            f"cannot create the folder {database.parent} for the database: {error.strerror or error}"
        ) from None
    unreadable: list[OSError] = []
    files = list(expand(paths, unreadable.append))
    styled = sys.stdout.isatty()  # rich (25-40 ms to import) only for a terminal
    if styled:
        from rich.console import Console

        emit: Callable[[str], None] = Console(stderr=False, highlight=False, soft_wrap=True).print
    else:
        emit = click.echo
    rejected = len(unreadable)
    for failure in unreadable:  # its files cannot be named, so they cannot be ledgered: said here
        reason = failure.strerror or str(failure)
        emit(f"rejected  {failure.filename}: cannot list this folder ({reason}); its files were not read")
    started = time.perf_counter()
    rows_total = 0
    store = _open(
        database, read_only=False,
        held="close it, or drop the files into the folder `meterdrop serve` watches",
    )  # fmt: skip
    with store, _progress(len(files)) as progress, ReadAhead() as read_ahead:

        def on_rows(n: int) -> None:
            nonlocal rows_total
            rows_total += n
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress(rate=f"{rows_total / elapsed:,.0f} rows/s")

        ingester = Ingester(
            store, on_rows=on_rows, timezone=timezone, limits=Limits(max_file_bytes=max_file_size),
            read_ahead=read_ahead,
        )  # fmt: skip
        done = 0
        while done < len(files):
            # Small files share a transaction and a MERGE per table (Ingester.ingest_group);
            # each group ends within about a second so that the progress bar keeps moving.
            try:
                outcomes = ingester.ingest_group(files[done:], until=time.monotonic() + _GROUP_SECONDS)
            except (duckdb.Error, OSError) as error:  # the machine's trouble, not the file's
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise click.ClickException(
                    f"stopped at {files[done]}: {reason}. Nothing of it was stored, and it is not in "
                    f"the ledger; {done} file(s) before it are. Fix the cause (memory, disk space), then "
                    "run the same command again: files already in the ledger are skipped."
                ) from None
            for outcome in outcomes:
                rejected += _any_rejected(outcome)
                for each, line in _outcome_lines(outcome, styled=styled):
                    if not quiet or each.status == "rejected":
                        emit(line)
            done += len(outcomes)
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress(completed=done, description=f"ingesting ({done / elapsed:,.1f} files/s)")
    elapsed = time.perf_counter() - started
    folders = f", {len(unreadable)} folder(s) unreadable" if unreadable else ""
    click.echo(
        f"{len(files)} file(s){folders}, {rejected} rejected, {rows_total:,} rows in {elapsed:.1f}s "
        f"({rows_total / max(elapsed, 1e-9):,.0f} rows/s) into {database}",
        err=True,
    )
    sys.exit(1 if rejected else 0)


@main.command(context_settings=CONTEXT)
@_data_dir_option
@_db_option
@click.option(
    "--rejects", default=10, show_default=True, type=click.IntRange(min=0),
    help="How many of the latest rejects to list.",
)  # fmt: skip
def status(data_dir: Path, db: Path | None, rejects: int) -> None:
    """What the ledger holds: counts by status and format, latest rejects, newest deliveries.

    \b
    Example:
      meterdrop status --data-dir /srv/meterdrop
    """
    with _open_existing(_database(data_dir, db)) as store:
        from rich.table import Table

        con = store.con
        console = _report_console()
        counts = Table(title="Files by status and format")
        for name in ("status", "format", "files", "rows"):
            counts.add_column(name, justify="right" if name in ("files", "rows") else "left")
        for status_, fmt, files, rows in con.execute(
            "SELECT status, coalesce(format, '-'), count(*), coalesce(sum(rows), 0) FROM files "
            "GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            counts.add_row(status_, fmt, f"{files:,}", f"{rows:,}")
        console.print(counts)
        newest = Table(title="Newest delivery per format")
        newest.add_column("format")
        newest.add_column("delivered_at (UTC)")
        newest.add_column("path")
        for fmt, delivered, path in con.execute(
            "SELECT format, delivered_at, path FROM files WHERE status = 'ingested' "
            "QUALIFY row_number() OVER (PARTITION BY format ORDER BY delivered_at DESC, path DESC) = 1 "
            "ORDER BY format"
        ).fetchall():
            newest.add_row(fmt, delivered.isoformat(sep=" "), path)
        console.print(newest)
        latest = con.execute(
            "SELECT first_seen_at, path, error FROM files WHERE status = 'rejected' "
            "ORDER BY first_seen_at DESC, id DESC LIMIT ?",
            [rejects],
        ).fetchall()
        if latest:
            bad = Table(title=f"Latest {len(latest)} rejected file(s)")
            bad.add_column("seen (UTC)")
            bad.add_column("path")
            bad.add_column("reason")
            for seen, path, error in latest:
                bad.add_row(seen.strftime("%Y-%m-%d %H:%M:%S"), path, error)
            console.print(bad)
        else:
            console.print("No rejected files.")


@main.command(context_settings=CONTEXT)
@_data_dir_option
@_db_option
def check(data_dir: Path, db: Path | None) -> None:
    """Check that the ledger and the tables agree; exit 1 and list what does not.

    Recomputed from the database alone, read-only: every reading row belongs to a file
    the ledger calls ingested (same path and delivery time), no reading key occurs twice,
    no rejected or duplicate file left rows behind, no content was ingested twice, no file
    holds more rows than it delivered, and no scratch table is left from a crashed run.
    Run it after a crash, a full disk or a restore; `meterdrop serve` may keep running.

    \b
    Example:
      meterdrop check --data-dir /srv/meterdrop
    """
    from processor.check import check as recompute

    with _open_existing(_database(data_dir, db)) as store:
        report = recompute(store.con)
    if report.ok:
        click.echo(f"ok: {report.summary()}")
        return
    click.echo(f"{len(report.problems)} problem(s) in {_database(data_dir, db)} ({report.summary()}):")
    for problem in report.problems:
        click.echo(f"  - {problem}")
    sys.exit(1)


def _report_console() -> Console:
    """A console for tables: as wide as the terminal, or unlimited when piped, so no value is cut."""
    from rich.console import Console

    return Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 100_000)


def _plain(value: Any, *, json_safe: bool = False) -> Any:
    """A DuckDB value as JSON can hold it: times in ISO 8601, lists and structs inside out.

    ``json_safe`` also turns NaN and infinities into null, which JSON has no words for.
    """
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    if isinstance(value, timedelta):  # INTERVAL, or the difference of two times
        seconds = value.total_seconds()
        return f"{'-' if seconds < 0 else ''}PT{abs(seconds):g}S"
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and json_safe and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(item, json_safe=json_safe) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item, json_safe=json_safe) for key, item in value.items()}
    return value


def _cell(value: Any) -> Any:
    """One value for a CSV or table cell: a list or struct as JSON text, not Python's repr."""
    plain = _plain(value)
    return json.dumps(plain, default=str) if isinstance(plain, list | dict) else plain


@main.command(context_settings=CONTEXT)
@_data_dir_option
@_db_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="How to print the result.",
)
@click.argument("sql")
def query(data_dir: Path, db: Path | None, output: str, sql: str) -> None:
    """Run SQL against the database, read-only, and print the result.

    Times are TIMESTAMPTZ and print in UTC (ISO 8601 in CSV and JSON). Several statements
    separated by ";" run in order; the last one's result is printed.

    \b
    Examples:
      meterdrop query "SELECT device_name, sum(energy_wh) FROM panoramic_measurements GROUP BY ALL"
      meterdrop query --format csv "SELECT * FROM energy_readings" > readings.csv
    """
    with _open_existing(_database(data_dir, db)) as store:
        try:
            relation = store.con.execute(sql)
        except duckdb.Error as error:
            raise click.ClickException(str(error)) from None
        columns = [d[0] for d in relation.description or []]
        rows = relation.fetchall()
    if output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(v) for v in row] for row in rows])
    elif output == "json":
        # Made whole before anything is written: a value that failed halfway left half a document.
        text = json.dumps(
            [{c: _plain(v, json_safe=True) for c, v in zip(columns, row, strict=True)} for row in rows],
            indent=None, allow_nan=False, default=str,
        )  # fmt: skip
        sys.stdout.write(text + "\n")
    else:
        from rich.table import Table

        table = Table(show_lines=False)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*("NULL" if v is None else str(_cell(v)) for v in row))
        _report_console().print(table)


def _port_range(ctx: click.Context, param: click.Parameter, value: str) -> range:
    try:
        first, last = (int(p) for p in value.split("-", 1))
    except ValueError:
        raise click.BadParameter("expected FIRST-LAST, e.g. 8192-8200") from None
    if not 0 < first <= last < 65536:
        raise click.BadParameter("ports must satisfy 0 < FIRST <= LAST < 65536")
    return range(first, last + 1)


@main.command(context_settings=CONTEXT)
@_data_dir_option
@_db_option
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--sftp-port", default=2222, show_default=True, help="SFTP port (22 in the container).")
@click.option(
    "--ftps-port", default=2121, show_default=True, help="Explicit-FTPS control port (21 in the container)."
)
@click.option(
    "--passive-ports",
    default="8192-8200",
    show_default=True,
    callback=_port_range,
    help="FTPS passive data ports, FIRST-LAST; when all are busy a client gets 425.",
)
@click.option(
    "--public-host", default=None, envvar="METERDROP_PUBLIC_HOST",
    help="Address announced in PASV replies (behind NAT or in a container; env METERDROP_PUBLIC_HOST).",
)  # fmt: skip
@click.option(
    "--certs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    show_default=True,
    envvar="METERDROP_CERTS_DIR",
    help="TLS certificate (ftps.crt, ftps.key) and SSH host keys; generated on first start "
    "(env METERDROP_CERTS_DIR).",
)
@click.option(
    "--max-upload-size",
    default="4G",
    show_default=True,
    callback=_size,
    help="Largest upload accepted, e.g. 500M.",
)
@_timezone_option
@_max_file_size_option
@click.option(
    "--max-connections-per-ip", default=10, show_default=True, help="FTPS connections one address may hold."
)
@click.option(
    "--idle-timeout", default=300, show_default=True, help="Seconds before an idle FTPS session is closed."
)
@click.option(
    "--ban-after",
    default=15,
    show_default=True,
    help="Failed logins within --ban-window that ban an address.",
)
@click.option(
    "--ban-window", default=1800, show_default=True, help="Seconds over which failed logins are counted."
)
@click.option(
    "--ban-time", default=1800, show_default=True, help="Seconds an address stays banned (both protocols)."
)
@click.option("--verbose", "-v", is_flag=True, help="Log every connection and command.")
def serve(data_dir: Path, db: Path | None, host: str, sftp_port: int, ftps_port: int, passive_ports: range,
          public_host: str | None, certs_dir: Path, max_upload_size: int | None, timezone: str | None,
          max_file_size: int, max_connections_per_ip: int, idle_timeout: int, ban_after: int, ban_window: int, ban_time: int,
          verbose: bool) -> None:  # fmt: skip
    """Run the SFTP and FTPS drop servers and ingest every complete delivery.

    Users (see `meterdrop users`) log in with the same credentials over SFTP or
    explicit FTPS and upload into DATA_DIR/drop/<user>/; files copied into that tree
    by hand are taken too. Every complete file is ingested into the database within
    seconds; the database stays readable with `meterdrop query` meanwhile. Stop with
    Ctrl-C (SIGINT) or SIGTERM.

    \b
    Example:
      meterdrop users add acme --password-stdin <<< 'a long passphrase'
      meterdrop serve --data-dir /srv/meterdrop --public-host drop.example.com
    """
    import logging

    import uvloop

    from fileserver.guard import GuardPolicy
    from meterdrop.serve import AlreadyServed, ServeConfig
    from meterdrop.serve import serve as run

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not verbose:
        for noisy in ("asyncssh", "pyftpdlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    config = ServeConfig(
        data_dir=data_dir, database=_database(data_dir, db), certs_dir=certs_dir, host=host, sftp_port=sftp_port,
        ftps_port=ftps_port, passive_ports=passive_ports, public_host=public_host,
        max_upload_bytes=max_upload_size, timezone=timezone,
        guard=GuardPolicy(max_failures=ban_after, window=ban_window, ban_seconds=ban_time),
        max_connections_per_ip=max_connections_per_ip, idle_timeout=idle_timeout, max_file_bytes=max_file_size,
    )  # fmt: skip
    try:
        # asyncssh's packet path runs about 20% faster on uvloop than on asyncio's own loop
        # (bench/README.md, "SFTP on uvloop").
        uvloop.run(run(config))
    # ValueError: a --public-host that is no IPv4 address
    except (OSError, ValueError, NotADatabase, AlreadyServed) as error:
        raise click.ClickException(f"cannot start: {error}") from None


@main.group(context_settings=CONTEXT)
def users() -> None:
    """Manage who may deliver: one set of credentials serves SFTP and FTPS.

    Users are kept in DATA_DIR/users.json, passwords only as argon2id hashes; each
    user's uploads land in DATA_DIR/drop/<user>/.

    \b
    Example:
      echo 'a long passphrase' | meterdrop users add acme --password-stdin
      meterdrop users add panel1 --authorized-key panel1.pub
    """


def _user_store(data_dir: Path) -> UserStore:
    from fileserver.users import UserStore  # imported here: asyncssh costs `ingest` and `query` a startup

    return UserStore(data_dir)


@contextlib.contextmanager
def _user_errors(data_dir: Path) -> Iterator[None]:
    """A refused change (unknown user, bad key) or a data dir that cannot be written: one clear line."""
    try:
        yield
    except ValueError as error:  # fileserver.users.UserError
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(
            f"cannot write the users of {data_dir}: {error.strerror or error}"
            + (f" ({error.filename})" if error.filename else "")
        ) from None


def _read_password(from_stdin: bool, confirm: bool = True) -> str | None:
    if from_stdin:
        text = sys.stdin.readline().rstrip("\r\n")
        if not text:
            raise click.UsageError("--password-stdin: no password on standard input")
        return text
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm) if confirm else None


@users.command("add", context_settings=CONTEXT)
@_data_dir_option
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of standard input."
)
@click.option(
    "--authorized-key",
    "keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key file (OpenSSH or PEM/PKCS#8) allowed to log in over SFTP; repeatable.",
)
@click.argument("name")
def users_add(data_dir: Path, password_stdin: bool, keys: tuple[Path, ...], name: str) -> None:
    """Add a user. Without --password-stdin or --authorized-key, asks for a password.

    \b
    Example:
      meterdrop users add acme --password-stdin < password.txt
    """
    password = _read_password(password_stdin) if password_stdin or not keys else None
    with _user_errors(data_dir):
        _user_store(data_dir).add(name, password, [k.read_text(encoding="utf-8") for k in keys])
    click.echo(f"added {name}: uploads land in {data_dir / 'drop' / name}")


@users.command("passwd", context_settings=CONTEXT)
@_data_dir_option
@click.option("--password-stdin", is_flag=True, help="Read the new password from standard input.")
@click.argument("name")
def users_passwd(data_dir: Path, password_stdin: bool, name: str) -> None:
    """Set a user's password.

    \b
    Example:
      meterdrop users passwd acme
    """
    with _user_errors(data_dir):
        _user_store(data_dir).set_password(name, _read_password(password_stdin) or "")
    click.echo(f"password of {name} changed")


@users.command("remove", context_settings=CONTEXT)
@_data_dir_option
@click.argument("name")
def users_remove(data_dir: Path, name: str) -> None:
    """Remove a user; their drop folder and their ingested data stay.

    \b
    Example:
      meterdrop users remove acme
    """
    with _user_errors(data_dir):
        _user_store(data_dir).remove(name)
    click.echo(f"removed {name}")


@users.command("list", context_settings=CONTEXT)
@_data_dir_option
def users_list(data_dir: Path) -> None:
    """List users and how they may log in.

    \b
    Example:
      meterdrop users list --data-dir /srv/meterdrop
    """
    listed = _user_store(data_dir).everyone()
    if not listed:
        click.echo("no users: add one with `meterdrop users add NAME --password-stdin`")
    for user in listed:
        ways = (["password"] if user.password_hash else []) + [f"{len(user.authorized_keys)} key(s)"] * bool(
            user.authorized_keys
        )
        click.echo(f"{user.name}\t{', '.join(ways)}")
