"""Ratios to a baseline measured in the same run: the one comparison every benchmark and the GPU check report
(a ratio across runs would mix in the machine's load)."""

from __future__ import annotations


def add_ratios(rows: dict[str, dict], baseline: str, key: str, ratio_key: str) -> dict[str, dict]:
    """``rows[name][ratio_key] = rows[name][key] / rows[baseline][key]`` for every row where both are measured
    (non-zero); returns ``rows``."""
    base = rows.get(baseline, {}).get(key)
    for row in rows.values():
        if base and row.get(key):
            row[ratio_key] = row[key] / base
    return rows
