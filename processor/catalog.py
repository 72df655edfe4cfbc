"""Panoramic Catalog snapshots (v1.0 and v1.1): topology rows whose columns are not public.

Because the CSV layout is unpublished, every column the file has is kept as text under
its snake_case name; the entity a row describes is found from the id-like columns
(``id``, then ``device_id``, ``panel_id``, ``zone_id``, ``site_id``, ``account_id``), and
v1.1 is told from v1.0 by its account-level columns.  Both rules are our reading of the
vendor's JSON form (formats.md) and are documented in the README as such.
"""

from __future__ import annotations

import polars as pl

from processor.errors import Rejected, at_line
from processor.headers import HeaderField
from processor.panoramic import MISSING_LIST

FORMAT = "panoramic_catalog"
TABLE = "panoramic_catalog"
KEY = ("entity_kind", "entity_id", "snapshot_date")
OWN_COLUMNS = ("entity_kind", "entity_id", "snapshot_date", "catalog_version")
_ID_PRIORITY = ("id", "entity_id", "device_id", "panel_id", "zone_id", "site_id", "account_id")
_TYPE_COLUMNS = ("type", "entity_type")
_RESERVED = {*OWN_COLUMNS, "file_id", "delivered_at", "source_path", "source_line"} - {"entity_id"}


def vendor_columns(fields: list[HeaderField]) -> list[str]:
    """Column names for the file's own cells, unique and clear of ours."""
    names: list[str] = []
    for f in fields:
        name = f.column or "unnamed"
        name = f"vendor_{name}" if name in _RESERVED else name
        if name in names:
            raise Rejected(f"catalog header has two columns named {f.raw.strip()!r}", format_name=FORMAT)
        names.append(name)
    return names


def catalog_rows(fields: list[HeaderField], raw: pl.DataFrame, first_line: int) -> pl.DataFrame:
    """Rows with the entity they describe, all vendor cells as text (empty and N/A as NULL)."""
    names = vendor_columns(fields)
    cells = raw.select(
        pl.when(pl.col(f"c{i}").is_in(MISSING_LIST)).then(None).otherwise(pl.col(f"c{i}")).alias(name)
        for i, name in enumerate(names)
    )
    id_columns = [c for c in _ID_PRIORITY if c in names]
    type_column = next((c for c in _TYPE_COLUMNS if c in names), None)
    kinds = []
    for c in id_columns:
        if c in ("id", "entity_id"):
            kind = pl.col(type_column).str.to_lowercase() if type_column else pl.lit("entity")
            kinds.append(pl.when(pl.col(c).is_not_null()).then(kind.fill_null("entity")))
        else:
            kinds.append(pl.when(pl.col(c).is_not_null()).then(pl.lit(c.removesuffix("_id"))))
    version = "1.1" if any(n.startswith("account") for n in names) else "1.0"
    rows = cells.with_columns(
        pl.coalesce(kinds).alias("entity_kind"),
        pl.coalesce(pl.col(c) for c in id_columns).alias("entity_id"),
        pl.lit(version).alias("catalog_version"),
        pl.int_range(first_line, first_line + cells.height, dtype=pl.Int64).alias("source_line"),
    )
    missing = rows["entity_id"].is_null().arg_true()
    if len(missing):
        raise Rejected(
            at_line(first_line + int(missing[0]), f"no entity id in {', '.join(id_columns)}"),
            format_name=FORMAT,
        )
    return rows
