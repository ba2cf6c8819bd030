"""Seed-to-seed spread of the mini reproduction's metrics and the wording that follows from it: a difference is
*noise* when not larger than the seed spread (the larger of the two sample standard deviations over seeds; none
with one seed). A rule of thumb for a handful of seeds, not a significance test.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

# The metrics every run reports: (key in the collected rows, title, format of one value).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("knn_top1", "k-NN top-1 (%)", "{:.2f}"),
    ("seg_miou_patch", "mIoU patch (%)", "{:.2f}"),
    ("seg_miou_patch_cls", "mIoU patch+[CLS] (%)", "{:.2f}"),
    ("last_layer_attention_zero_share", "exact zeros, last block", "{:.1%}"),
    ("last_layer_cos_to_cls", "cos(patch, [CLS]), last block", "{:.3f}"),
    ("last_layer_attention_distance", "attention distance (patches), last block", "{:.2f}"),
)

# The paper's two analysis claims (analysis.claims), as differences in points that the claim says are > 0.
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("fg_shallow_minus_deep", "(a) foreground Jaccard of [CLS] attention, shallow - deep blocks", "{:+.2f}"),
    ("miou_deep_minus_shallow", "(a) segmentation probe mIoU, deep - shallow blocks", "{:+.2f}"),
    ("cls_gain_miou", "(b) mIoU gained by concatenating [CLS] (patch+[CLS] - patch)", "{:+.2f}"),
)


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (nan for one seed), min and max of one metric over seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n >= 2 else math.nan

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    def format(self, spec: str) -> str:
        if not self.values:
            return "n/a"
        if self.n == 1:
            return spec.format(self.mean)
        return f"{spec.format(self.mean)} ± {spec.format(self.std)} [{spec.format(self.min)}, {spec.format(self.max)}]"


def seed_table(rows: Sequence[Mapping], columns: Sequence[str], metrics: Sequence[tuple[str, str, str]],
               titles: Sequence[str] = ()) -> list[str]:
    """A markdown table, one line per row: its ``columns``, then each metric by its spec ("n/a" when missing)."""
    titles = list(titles) or [title for _, title, _ in metrics]
    lines = ["| " + " | ".join([*columns, *titles]) + " |", "|" + "---|" * (len(columns) + len(titles))]
    for row in rows:
        values = [row.get(key) for key, _, _ in metrics]
        cells = ["n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)
                 for v, (_, _, spec) in zip(values, metrics)]
        lines.append("| " + " | ".join([*(str(row[c]) for c in columns), *cells]) + " |")
    return lines


def aggregate(rows: Sequence[Mapping], keys: Sequence[str]) -> dict[str, dict[str, Spread]]:
    """``{attention: {metric: Spread}}`` over the seeds of each transform (rows missing a metric are skipped)."""
    out: dict[str, dict[str, Spread]] = {}
    for attention in dict.fromkeys(row["attention"] for row in rows):
        runs = [row for row in rows if row["attention"] == attention]
        out[attention] = {key: Spread(tuple(float(r[key]) for r in runs if r.get(key) is not None)) for key in keys}
    return out


def verdict(base: Spread, other: Spread) -> str:
    if not base.values or not other.values:
        return "not measured"
    delta = other.mean - base.mean
    spread = max(base.std, other.std)
    if math.isnan(spread):
        return "one seed: spread unknown, cannot be told from noise"
    if abs(delta) <= spread:
        return "noise (within the seed spread)"
    return "beyond the seed spread"


def comparison_lines(table: Mapping[str, Mapping[str, Spread]], baseline: str,
                     metrics: Sequence[tuple[str, str, str]] = METRICS) -> list[str]:
    """One markdown bullet per (transform, metric) against ``baseline``, generated from the numbers."""
    lines = []
    for attention, spreads in table.items():
        if attention == baseline or baseline not in table:
            continue
        for key, title, spec in metrics:
            base, other = table[baseline][key], spreads[key]
            if not base.values or not other.values:
                continue
            delta, spread = other.mean - base.mean, max(base.std, other.std)
            points = spec.endswith("%}")  # a share: its difference is told in percentage points
            shown = f"{100 * delta:.1f} points" if points else spec.format(delta)
            spread_text = ("n/a" if math.isnan(spread) else f"{100 * spread:.1f} points" if points
                           else spec.format(spread))
            sign = "+" if delta >= 0 and not shown.startswith("-") else ""
            lines.append(f"- {title}: {attention} - {baseline} = {sign}{shown} (seed spread {spread_text}): "
                         f"{verdict(base, other)}.")
    return lines


def claim_lines(table: Mapping[str, Mapping[str, Spread]]) -> list[str]:
    """One bullet per (claim, transform): seeds with a difference > 0, and whether its mean exceeds the spread."""
    lines = []
    for key, title, spec in CLAIMS:
        for attention, spreads in table.items():
            s = spreads.get(key)
            if s is None or not s.values:
                continue
            positive = sum(v > 0 for v in s.values)
            if s.n < 2:
                state = "one seed: cannot be told from noise"
            elif s.mean > s.std:
                state = "holds beyond the seed spread"
            elif s.mean < -s.std:
                state = "the opposite holds beyond the seed spread"
            else:
                state = "within noise (|mean| not larger than the seed spread)"
            lines.append(f"- {title}, {attention}: {s.format(spec)}; > 0 in {positive} of {s.n} seeds: {state}.")
    return lines
