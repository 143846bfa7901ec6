"""normkd-leaderboard PATH...: find finished and unfinished runs, aggregate, compare, check.

    normkd-leaderboard output/ [--format md|csv|json] [--plot bars.png] [--curves curves.png]
    normkd-leaderboard output/ --check thresholds.yaml     # exit 1 on a regression
    normkd-leaderboard output/ --field [--field-of res56_res20,res32x4_res8x4]   # among the published field
    normkd-leaderboard output/ --format latex > table.tex  # booktabs: your rows and the published field

A PATH that does not exist, a malformed thresholds file, or --curves with no run to draw (a
--select that matches none) is an error (exit 2, nothing written); a PATH that holds no run is
reported on stderr. Symbolic links to run folders are followed (each real folder once); every
path that cannot be read (a dangling link, a damaged worklog) is listed under "Skipped". A run is
finished when its worklog holds every epoch of its SOLVER.EPOCHS, then a best_acc line equal to
its best test_acc. Failed runs (a final "failed<TAB>reason" worklog line) and invalid runs (a
value that is not finite, an accuracy outside [0, 100], a best_acc line that does not end a
finished worklog) are listed apart and never averaged; --check fails while any run found is
invalid, and when no run is found at all. Runs of one method, settings and seed whose worklogs
hold the same records (a run copied to a second folder) are counted once, the first by path; the
others are listed apart as duplicates.

Check names: a row is named dataset/pair/method, as in the table's first three columns, e.g.
cifar100/res56_res20/normkd. Without a trainer the name matches that method's row whatever its
trainer, as long as only one trainer has rows for it (else the check fails and names the
candidates); "cifar100/res56_res20/normkd (fast)" requires the fast trainer and
"cifar100/res56_res20/normkd (base)" the host's own trainer.

Thresholds file (every section optional, each once; a malformed one is refused naming its line)::

    min_best_acc:              # dataset/pair/method: minimum mean best top-1
      cifar100/res56_res20/normkd: 70.5
    required:                  # dataset/pair/method that must have a finished run
      - cifar100/res56_res20/kd
    normkd_beats_kd:           # dataset/pair[ (trainer)] where mean best NormKD must exceed KD
      - cifar100/res56_res20
    beats_with_ci:             # dataset/pair/method>baseline: the 95 % interval of
      - cifar100/res56_res20/normkd>kd   # method - baseline in best top-1 must lie above 0
      - cifar100/res56_res20/normkd (fast)>kd (fast)

beats_with_ci uses the interval shown in the table: paired over the seeds both methods have
(Student's t, n-1 dof), else Welch; it fails when there are too few runs for an interval
(fewer than 2 pairs, or 2 runs a side). The baseline runs with the method's trainer when it has
rows for it, else with the host's; name one to choose, e.g. "normkd (fast)>kd (base)".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from .._cli import quiet_pipe
from ..errors import UserError
from .field import FieldError, tables
from .render import field_json, field_markdown, latex, markdown, plot_bars, plot_curves, to_csv, to_json
from .results import discover_runs
from .table import Row, aggregate, baseline_row, compare_rows

log = logging.getLogger("normkd_plugin.leaderboard")

_SECTIONS = ("min_best_acc", "required", "normkd_beats_kd", "beats_with_ci")
_TRAINER = re.compile(r"^(.*?)\s*\(([^()]+)\)$")


def _split_trainer(name: str) -> tuple[str, str | None]:
    m = _TRAINER.match(name.strip())
    return (m.group(1), m.group(2).strip()) if m else (name.strip(), None)


class ThresholdsError(UserError, ValueError):
    """A thresholds file that cannot be read or does not follow the documented sections."""


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_LIST_SECTIONS = ("required", "normkd_beats_kd", "beats_with_ci")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _shown(node: yaml.Node) -> str:
    """A value as written, for a message: a scalar quoted, else what kind of thing it is."""
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value[:80])
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _pairs(path: str, node: yaml.MappingNode, where: str) -> list[tuple[str, yaml.Node, int]]:
    """(key, value node, line) of a mapping whose keys are names, each given once; ThresholdsError otherwise."""
    out, first = [], {}
    for key_node, value in node.value:
        line = _line(key_node)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            raise ThresholdsError(f"{path}: line {line}: {where}: expected a name as key, got {_shown(key_node)}")
        key = key_node.value
        if key in first:
            raise ThresholdsError(
                f"{path}: line {line}: {where}: {key} given twice (first on line {first[key]}); keep one"
            )
        first[key] = line
        out.append((key, value, line))
    return out


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _minimum(path: str, key: str, node: yaml.Node, line: int, loader) -> float:
    """A min_best_acc value: a number from 0 to 100."""
    value = loader.construct_object(node) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:  # (.nan fails)
        raise ThresholdsError(
            f"{path}: line {line}: min_best_acc: {key}: expected a minimum mean best top-1 from 0 to 100, "
            f"got {_shown(node)}"
        )
    return float(value)


def _names(path: str, section: str, node: yaml.Node) -> list[str]:
    """A list section's entries: names (strings)."""
    if not isinstance(node, yaml.SequenceNode):
        raise ThresholdsError(
            f"{path}: line {_line(node)}: section {section}: expected a list of names, got {_shown(node)}"
        )
    names = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or item.tag != "tag:yaml.org,2002:str":
            raise ThresholdsError(f"{path}: line {_line(item)}: section {section}: expected a name, got {_shown(item)}")
        if section == "beats_with_ci":
            method, sep, baseline = item.value.partition(">")
            if not sep or ">" in baseline or method.count("/") != 2 or "/" in baseline or not baseline.strip():
                raise ThresholdsError(
                    f"{path}: line {_line(item)}: section beats_with_ci: {item.value!r} is not dataset/pair/method>baseline"
                )
        names.append(item.value)
    return names


def load_thresholds(path: str) -> dict:
    """The thresholds YAML, every entry checked as configs are: ThresholdsError naming the file, the line, the
    section or key and what it wants (UTF-8 YAML; known sections, each once; names; minimums from 0 to 100)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ThresholdsError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); expected YAML thresholds"
        ) from None
    except OSError as exc:
        raise ThresholdsError(f"cannot read thresholds {path}: {exc.strerror or exc}") from None
    loader = _LOADER(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise ThresholdsError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    finally:
        loader.dispose()
    if root is None or _is_null(root):
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ThresholdsError(
            f"{path}: line {_line(root)}: expected a mapping of sections {_SECTIONS}, got {_shown(root)}"
        )
    sections = _pairs(path, root, "sections")
    unknown = [(key, line) for key, _, line in sections if key not in _SECTIONS]
    if unknown:
        names = sorted(key for key, _ in unknown)
        raise ThresholdsError(f"{path}: line {unknown[0][1]}: unknown section(s) {names}; expected {_SECTIONS}")
    data: dict = {}
    for section, node, line in sections:
        if _is_null(node):  # a section with nothing under it
            data[section] = {} if section == "min_best_acc" else []
        elif section == "min_best_acc":
            if not isinstance(node, yaml.MappingNode):
                raise ThresholdsError(
                    f"{path}: line {line}: section min_best_acc: expected a mapping dataset/pair/method: minimum, "
                    f"got {_shown(node)}"
                )
            data[section] = {key: _minimum(path, key, v, n, loader) for key, v, n in _pairs(path, node, "min_best_acc")}
        else:
            data[section] = _names(path, section, node)
    return data


def resolve(rows: list[Row], key: str) -> tuple[Row | None, str | None]:
    """(row, None) for a check name dataset/pair/method[ (trainer)], else (None, why it matches no single row)."""
    dataset, _, rest = key.partition("/")
    pair, _, method = rest.partition("/")
    method, trainer = _split_trainer(method)
    cands = [r for r in rows if (r.dataset, r.pair, r.base_method) == (dataset, pair, method)]
    if trainer is not None:
        cands = [r for r in cands if r.trainer == trainer]
    if not cands:
        return None, "no runs"
    if len({r.trainer for r in cands}) > 1:
        names = ", ".join(f"{dataset}/{pair}/{r.base_method} ({r.trainer})" for r in cands)
        return None, f"ambiguous: rows of several trainers match ({names}); name one"
    if len(cands) > 1:
        settings = "; ".join(f"[{r.setting}]" for r in cands)
        return None, f"ambiguous: runs of several settings match ({settings}); keep one setting per output folder"
    return cands[0], None


def _baseline(rows: list[Row], row: Row, name: str) -> tuple[Row | None, str | None]:
    method, trainer = _split_trainer(name)
    base = baseline_row(rows, row, method, trainer)
    where = (
        f"trainer {trainer}" if trainer else f"trainer {row.trainer}" + ("" if row.trainer == "base" else " or base")
    )
    return base, None if base else f"no single {method} row on {row.dataset}/{row.pair} trained alike ({where})"


def _beats_with_ci(rows: list[Row], entry: str) -> str | None:
    left, _, right = entry.partition(">")
    row, why = resolve(rows, left.strip())
    if row is None:
        return f"{entry}: {left.strip()}: {why}"
    base, why = _baseline(rows, row, right)
    if base is None:
        return f"{entry}: {why}"
    diff = compare_rows(row, base, "best")
    what = f"{row.method} − {base.method} in best top-1"
    if diff.mean is None:
        return f"{entry}: cannot compare: {diff.note}"
    if diff.low is None:
        return f"{entry}: too few runs for a 95 % interval ({diff.sample}); {what} = {diff.mean:+.2f}"
    if not diff.above_zero:
        return f"{entry}: 95 % interval of {what} is [{diff.low:+.2f}, {diff.high:+.2f}] ({diff.sample}), not above 0"
    return None


def _left_out(row: Row | None) -> list[str]:
    """["1 failed", "1 invalid"]: the runs of a row that no mean counts."""
    return [f"{n} {what}" for n, what in ((row.failed, "failed"), (row.invalid, "invalid")) if n] if row else []


def check(rows: list[Row], thresholds: dict) -> list[str]:
    """Human-readable failures of the thresholds (empty when all hold); a check of no run at all, or of runs
    of which one is invalid (numbers no run can have), fails whatever the thresholds."""
    failures = [] if rows else ["no run found: nothing to check"]
    failures += [f"{run.path}: invalid run: {run.invalid}" for row in rows for run in row.invalid_runs]
    for key, minimum in (thresholds.get("min_best_acc") or {}).items():
        row, why = resolve(rows, key)
        if row is not None and row.best_mean is None:
            why = ("no epoch logged yet" if row.runs else "no runs") + "".join(f" ({n})" for n in _left_out(row))
        if why:
            failures.append(f"{key}: {why} (minimum {minimum:.2f})")
        elif row.best_mean < minimum:
            failures.append(f"{key}: mean best top-1 {row.best_mean:.2f} < minimum {minimum:.2f} ({row.runs} runs)")
    for key in thresholds.get("required") or []:
        row, why = resolve(rows, key)
        if row is None and why != "no runs":
            failures.append(f"{key}: {why}")
        elif row is None or row.finished == 0:
            notes = [f"unfinished: {row.progress}"] if row and row.progress else []
            notes += _left_out(row)
            failures.append(f"{key}: required run missing" + (f" ({'; '.join(notes)})" if notes else ""))
    for key in thresholds.get("normkd_beats_kd") or []:
        pair, trainer = _split_trainer(key)
        ours, why = resolve(rows, f"{pair}/normkd" + (f" ({trainer})" if trainer else ""))
        kd = None
        if ours is None:
            why = "missing NormKD runs" if why == "no runs" else why
        else:
            kd, why = _baseline(rows, ours, "kd")
            if kd is not None and (ours.best_mean is None or kd.best_mean is None):
                why = f"no usable {'NormKD' if ours.best_mean is None else 'KD'} runs"
        if why is not None:
            failures.append(f"{key}: NormKD vs KD cannot be compared ({why})")
        elif ours.best_mean <= kd.best_mean:
            failures.append(f"{key}: NormKD {ours.best_mean:.2f} does not beat KD {kd.best_mean:.2f}")
    for entry in thresholds.get("beats_with_ci") or []:
        failure = _beats_with_ci(rows, entry)
        if failure:
            failures.append(failure)
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
    ap.add_argument("--format", choices=("md", "csv", "json", "latex"), default="md")
    ap.add_argument(
        "--field", action="store_true", help="md/json: each pair's published field with your runs ranked in it"
    )
    ap.add_argument("--field-of", default="", metavar="PAIRS", help="also the field of these pairs (comma-separated)")
    ap.add_argument("--plot", metavar="FILE.png", help="grouped bar chart of mean best top-1")
    ap.add_argument("--curves", metavar="FILE.png", help="test top-1 per epoch of the selected runs")
    ap.add_argument("--select", default="", help="only runs whose folder path contains this text (for --curves)")
    ap.add_argument("--check", metavar="THRESHOLDS.yaml", help="exit 1 when a threshold fails")
    args = ap.parse_args(argv)

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        ap.error(f"no such file or directory: {', '.join(missing)}")
    try:
        thresholds = load_thresholds(args.check) if args.check else None
    except ThresholdsError as exc:
        print(f"normkd-leaderboard: {exc}", file=sys.stderr)
        sys.exit(2)
    field_names = [n.strip() for n in args.field_of.split(",") if n.strip()]
    want_field = args.field or bool(field_names) or args.format == "latex"
    if want_field and args.format == "csv":
        print(
            "normkd-leaderboard: --field goes with --format md, json or latex (csv holds the runs' rows)",
            file=sys.stderr,
        )
        sys.exit(2)
    runs, problems = discover_runs(args.paths)
    selected = [r for r in runs if args.select in str(r.path)]
    if args.curves and not selected:
        what = f"--select {args.select!r} matches no run" if args.select else "--curves: no run to draw"
        print(f"normkd-leaderboard: {what} (of {len(runs)} found)", file=sys.stderr)
        sys.exit(2)
    for root in args.paths:
        if not any(_under(path, root) for path in [r.path for r in runs] + [p for p, _ in problems]):
            print(f"normkd-leaderboard: no run (folder with a worklog.txt) under {root}", file=sys.stderr)
    for path, why in problems:
        log.warning("skipped %s: %s", path, why)
    rows = aggregate(runs)
    try:
        field = tables(rows, field_names) if want_field else []
    except FieldError as exc:
        print(f"normkd-leaderboard: {exc}", file=sys.stderr)
        sys.exit(2)
    with quiet_pipe():
        if args.format == "md":
            sys.stdout.write(markdown(rows, problems) + field_markdown(field))
        elif args.format == "csv":
            sys.stdout.write(to_csv(rows))
        elif args.format == "latex":
            sys.stdout.write(latex(rows, field))
        else:
            text = to_json(rows, problems)
            if want_field:
                text = json.dumps({**json.loads(text), "field": field_json(field)}, indent=2)
            sys.stdout.write(text + "\n")
    if args.plot:
        plot_bars(rows, args.plot)
    if args.curves:
        plot_curves(selected, args.curves)
    if args.check:
        failures = check(rows, thresholds)
        if failures:
            print(f"\nregression check failed ({len(failures)}):", file=sys.stderr)
            for line in failures:
                print(f"  - {line}", file=sys.stderr)
            sys.exit(1)
        print("\nregression check passed", file=sys.stderr)


def _under(path: Path, root: str) -> bool:
    """Whether ``path`` was found under ``root`` (as given: a run reached through a symbolic link is under it)."""
    base = Path(os.path.abspath(root))
    base = base.parent if base.is_file() else base
    return Path(os.path.abspath(path)).is_relative_to(base)


if __name__ == "__main__":
    main()
