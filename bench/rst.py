#!/usr/bin/env python3
"""Print a run's summary table (``run.py --json FILE``) as the
reStructuredText ``list-table`` of docs/performance.rst, so that the page's
table comes from one run, unedited.

    python3 bench/run.py --scenarios enqueue,drain,runmailer_pg --json out.json
    python3 bench/rst.py out.json [--scenarios enqueue,drain]

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys

DATABASES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
TARGET_WORDS = {"MET": "met", "MISSED": "missed"}


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def rows(summary: list[dict], scenarios: set[str] | None) -> list[list[str]]:
    out = []
    for row in summary:
        if scenarios and row["scenario"] not in scenarios:
            continue
        if "unit" not in row:  # provider, latency, quota: their own tables
            continue
        unit = row["unit"]
        measure = row["label"] if unit == "x" else f"{row['label']}, {unit}"
        ratio = row.get("ratio_ours_over_dm232")
        target = row.get("target") or ""
        if target:
            target = f"{target.replace('>=', '≥').replace('<=', '≤')} ({TARGET_WORDS.get(row.get('status'), row.get('status') or '?')})"
        out.append(
            [
                row["scenario"],
                DATABASES.get(row["db"], row["db"]),
                measure,
                number(row.get("dm232"), unit),
                number(row.get("ours"), unit),
                "–" if ratio is None else f"{ratio:.2f}×",
                target or "–",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_file")
    ap.add_argument("--scenarios", help="comma-separated; default: every scenario in the file")
    args = ap.parse_args(argv)
    with open(args.json_file, encoding="utf-8") as fh:
        data = json.load(fh)
    wanted = set(args.scenarios.split(",")) if args.scenarios else None
    print(".. list-table::")
    print("   :header-rows: 1")
    print("   :widths: 14 10 36 10 10 10 10")
    print()
    header = ["scenario", "database", "measure", "2.3.2", "ours", "ours / 2.3.2", "target"]
    for row in [header, *rows(data["summary"], wanted)]:
        print(f"   * - {row[0]}")
        for cell in row[1:]:
            print(f"     - {cell}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
