"""normkd-leaderboard PATH...: find finished and unfinished runs, aggregate, compare, check.

    normkd-leaderboard output/ [--format md|csv|json] [--plot bars.png] [--curves curves.png]
    normkd-leaderboard output/ --check thresholds.yaml     # exit 1 on a regression

Thresholds file (every section optional)::

    min_best_acc:              # dataset/pair/method: minimum mean best top-1
      cifar100/res56_res20/normkd: 70.5
    required:                  # dataset/pair/method that must have a finished run
      - cifar100/res56_res20/kd
    normkd_beats_kd:           # dataset/pair where mean best NormKD must exceed KD
      - cifar100/res56_res20
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from .render import markdown, plot_bars, plot_curves, to_csv, to_json
from .runs import discover_runs
from .table import Row, aggregate

log = logging.getLogger("normkd_plugin.leaderboard")

_SECTIONS = ("min_best_acc", "required", "normkd_beats_kd")


def load_thresholds(path: str) -> dict:
    """The thresholds YAML, with its sections checked; errors name the file and the section."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"normkd-leaderboard: cannot read thresholds {path}: {exc}") from exc
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise SystemExit(f"normkd-leaderboard: {path}: unknown section(s) {sorted(unknown)}; expected {_SECTIONS}")
    return data


def check(rows: list[Row], thresholds: dict) -> list[str]:
    """Human-readable failures of the thresholds (empty when all hold)."""
    cells = {f"{r.dataset}/{r.pair}/{r.method}": r for r in rows}
    failures = []
    for key, minimum in (thresholds.get("min_best_acc") or {}).items():
        row = cells.get(key)
        if row is None or row.best_mean is None:
            failures.append(f"{key}: no runs (minimum {minimum:.2f})")
        elif row.best_mean < minimum:
            failures.append(f"{key}: mean best top-1 {row.best_mean:.2f} < minimum {minimum:.2f} ({row.runs} runs)")
    for key in thresholds.get("required") or []:
        row = cells.get(key)
        if row is None or row.finished == 0:
            failures.append(f"{key}: required run missing" + (f" (unfinished: {row.progress})" if row else ""))
    for pair in thresholds.get("normkd_beats_kd") or []:
        ours, kd = cells.get(f"{pair}/normkd"), cells.get(f"{pair}/kd")
        if ours is None or kd is None or ours.best_mean is None or kd.best_mean is None:
            failures.append(
                f"{pair}: NormKD vs KD cannot be compared (missing {'NormKD' if ours is None else 'KD'} runs)"
            )
        elif ours.best_mean <= kd.best_mean:
            failures.append(f"{pair}: NormKD {ours.best_mean:.2f} does not beat KD {kd.best_mean:.2f}")
    return failures


def main(argv: list[str] | None = None) -> None:
    """Print the leaderboard; draw plots; run the threshold check."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    ap = argparse.ArgumentParser(
        prog="normkd-leaderboard",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("paths", nargs="+", help="output folders (LOG.PREFIX) or run folders")
    ap.add_argument("--format", choices=("md", "csv", "json"), default="md")
    ap.add_argument("--plot", metavar="FILE.png", help="grouped bar chart of mean best top-1")
    ap.add_argument("--curves", metavar="FILE.png", help="test top-1 per epoch of the selected runs")
    ap.add_argument("--select", default="", help="only runs whose folder path contains this text (for --curves)")
    ap.add_argument("--check", metavar="THRESHOLDS.yaml", help="exit 1 when a threshold fails")
    args = ap.parse_args(argv)

    runs, problems = discover_runs(args.paths)
    for path, why in problems:
        log.warning("skipped %s: %s", path, why)
    rows = aggregate(runs)
    if args.format == "md":
        sys.stdout.write(markdown(rows, problems))
    elif args.format == "csv":
        sys.stdout.write(to_csv(rows))
    else:
        sys.stdout.write(to_json(rows, problems) + "\n")
    if args.plot:
        plot_bars(rows, args.plot)
    if args.curves:
        plot_curves([r for r in runs if args.select in str(r.path)], args.curves)
    if args.check:
        failures = check(rows, load_thresholds(args.check))
        if failures:
            print(f"\nregression check failed ({len(failures)}):", file=sys.stderr)
            for line in failures:
                print(f"  - {line}", file=sys.stderr)
            sys.exit(1)
        print("\nregression check passed", file=sys.stderr)


if __name__ == "__main__":
    main()
