"""The shape every Green Button parser produces, and the ESPI code tables they share.

ESPI XML and the utilities' CSV downloads land in one table, ``greenbutton_intervals``;
both parsers emit polars frames with exactly ``INTERVAL_SCHEMA`` so the store needs to
know nothing about where a reading came from.
"""

from __future__ import annotations

import polars as pl

INTERVAL_SCHEMA: dict[str, pl.DataType] = {
    "usage_point": pl.String(),  # ESPI UsagePoint self href, or a CSV's account/meter/service
    "reading_type": pl.String(),  # ESPI ReadingType self href, or a CSV-derived descriptor
    "service_kind": pl.String(),  # electricity, gas, water, ...
    "flow_direction": pl.Int32(),  # ESPI code: 1 delivered/imported, 19 received/exported, 4 net
    "uom": pl.String(),  # Wh for electric energy, therm for gas energy, else the ESPI symbol
    "interval_start": pl.Datetime("us", "UTC"),
    "duration_s": pl.Int64(),
    "value": pl.Float64(),  # scaled, in uom
    "raw_value": pl.Float64(),  # as written in the file
    "power_of_ten_multiplier": pl.Int32(),
    "cost": pl.Float64(),  # currency units (ESPI writes 1/100,000 of them)
    "currency": pl.String(),  # ISO 4217 alpha code, e.g. USD
    "quality": pl.String(),  # valid, estimated, edited, ... (ESPI ReadingQuality names)
    "source_line": pl.Int64(),  # line (CSV) or reading ordinal (XML) in the file, for ties
}

INTERVAL_KEY = ("usage_point", "reading_type", "interval_start", "duration_s")

SERVICE_KINDS = {
    0: "electricity", 1: "gas", 2: "water", 3: "time", 4: "heat", 5: "refuse", 6: "sewerage",
    7: "rates", 8: "tv_licence", 9: "internet",
}  # fmt: skip

UOM_SYMBOLS = {
    0: None, 5: "A", 29: "V", 31: "J", 33: "Hz", 38: "W", 42: "m3", 61: "VA", 63: "VAr", 65: "cos_theta",
    71: "VAh", 72: "Wh", 73: "VArh", 106: "Ah", 119: "ft3", 122: "ft3/h", 125: "m3/h", 127: "gal/h",
    128: "gal", 132: "BTU", 133: "BTU/h", 169: "therm", 279: "MJ",
}  # fmt: skip

QUALITY_NAMES = {
    0: "valid", 7: "edited", 8: "estimated", 9: "interpolated", 10: "questionable", 11: "derived",
    12: "projected", 13: "mixed", 14: "raw", 15: "normalized_for_weather", 16: "other",
    17: "validated", 18: "verified", 19: "revenue_quality",
}  # fmt: skip

CURRENCIES = {840: "USD", 124: "CAD", 978: "EUR", 826: "GBP", 36: "AUD", 484: "MXN"}
