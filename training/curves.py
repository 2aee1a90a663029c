"""`python -m training.curves RUN_CSV... --out DIR`: the plot data `dvc plots` reads, from the CSV
logger's `metrics.csv`. Lightning writes one wide table whose rows each hold what one log call
carried (training rows, validation rows, lr rows), so a plot of one column straight from it has an
empty point on every other row. Here each run's table becomes one file per kind of row
(`<run>_train.csv`: step and train/*, `<run>_val.csv`: step and val/*), keeping only the rows that
have a value for that kind."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from anystory.atomic import write_atomic

KINDS = ("train", "val")


def split_rows(rows: list[dict[str, str]], kind: str) -> tuple[list[str], list[dict[str, str]]]:
    """The columns `step` and `<kind>/*`, and the rows that have a value in at least one of them."""
    columns = ["step"] + sorted({c for row in rows for c in row if c.startswith(f"{kind}/")})
    kept = [{c: row.get(c, "") for c in columns} for row in rows if any(row.get(c) for c in columns[1:])]
    return columns, kept


def write_curves(metrics_csv: Path, out_dir: Path, name: str) -> list[Path]:
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        columns, kept = split_rows(rows, kind)
        if len(columns) == 1:
            continue
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        written.append(write_atomic(out_dir / f"{name}_{kind}.csv", text.getvalue()))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=PATH of a run's metrics.csv (e.g. stage1=runs/x/csv/metrics.csv)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: runs: expected NAME=PATH, got {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such metrics file")
        for written in write_curves(Path(path), args.out, name):
            print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
