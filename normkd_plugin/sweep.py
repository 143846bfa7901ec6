"""normkd-sweep: the normkd-train command of every (method, pair, seed) run, or run them in turn.

    normkd-sweep --dataset cifar100 --methods kd,dkd,normkd,normdkd --pairs all --seeds 0,1,2 [--run] [KEY VALUE ...]
    normkd-sweep --pairs res56_res20 --seeds 0,1,2 --pack [--run] [KEY VALUE ...]   # one command per teacher

--methods defaults to the whole comparison: vanilla (the student alone; CIFAR-100 only), kd, dkd,
kd_ls, dkd_ls (logit standardization), normkd, normdkd.

Flags may stand before, between or after the KEY VALUE overrides (``--`` ends the flags).

Without --run it prints one command per line (for a cluster scheduler). With --run it executes
them one after another, skips runs whose folder already holds a finished worklog.txt (every
epoch, then ``best_acc``), resumes started ones, and reports a run that fails without stopping the rest.
Several sweeps over one grid share the work: a run locked by another process is skipped as
"running elsewhere", and waited for at the end (exit 0 when every run ended finished somewhere).
SIGINT and SIGTERM are passed on to the command running, which stops after its last committed
epoch; the sweep then exits 130 / 143. When the first commands all fail with the same input
error, the sweep stops there.
With --pack the grid is grouped into packs, one per dataset and teacher (at most N runs each with
--pack-size N): each pack is one ``normkd-train --cfg A --cfg B ... --seeds S`` trained by one job
(one process, or torchrun's with --nproc-per-node), with SOLVER.TRAINER fast for CIFAR-100 (data on
the device) and ddp for ImageNet (a data loader) implied.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from . import run_files
from ._cli import OverrideParser, parse_with_overrides, quiet_pipe, user_errors
from .errors import Interrupted, UserError
from .pairs import methods as dataset_methods
from .run_folder import LOCK  # a run folder's lock file
from .sweep_jobs import Job, PackJob, grid, job_folder, packs, split_names


def lock_holder(folder: str) -> str | None:
    """The PID (as written) of the process holding ``folder``'s run lock, or None when it is free or absent."""
    return run_files.lock_holder(os.path.join(folder, LOCK))


def _folders(job: Job | PackJob) -> list[str]:
    return [job_folder(cfg, seed, job.opts) for cfg, seed in job.runs()]


class _Child:
    """The command running now: stop signals are passed on to it; its stderr is shown and its last line kept."""

    active: _Child | None = None

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None
        self.last = ""  # the last stderr line of the latest command

    def __enter__(self):
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        _Child.active = self
        return self

    def __exit__(self, *exc):
        _Child.active = None
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        self.signal = self.signal or signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)  # it stops after its last committed epoch; we wait for it
        else:
            raise Interrupted(signum)

    def run(self, argv: list[str], env) -> int:
        """The exit code of ``argv``, run in its own session (a terminal's Ctrl-C reaches it through us)."""
        last = [""]
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, start_new_session=True)

        def relay():
            for raw in self.proc.stderr:
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
                if raw.strip():
                    last[0] = raw.decode(errors="replace").strip()

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        code = self.proc.wait()
        reader.join()
        self.proc.stderr.close()
        self.proc, self.last = None, last[0]
        if self.signal is not None:
            raise Interrupted(self.signal)
        return code


def launch(argv: list[str], env: dict | None = None) -> int:
    """Run one command of the sweep (stop signals passed on, stderr shown); its exit code."""
    return _Child.active.run(argv, env)


SAME_ERROR_STOP = 2  # the first this many commands failing with one input error (exit 2) stop the sweep


def _remaining(job: Job | PackJob) -> tuple[Job | PackJob | None, bool]:
    """(the job without the runs ``normkd-train --resume`` would skip as finished, or None; whether to pass --resume).

    The run lifecycle decides (``lifecycle.decision``), as normkd-train will. A pack gets --resume whenever any
    of its folders holds a run (finished runs are then skipped and new ones start); a solo job when its run has.
    A folder that cannot be read is left to normkd-train, which says what is wrong with it (a failed command:
    the sweep goes on with the next).
    """
    plans = {run: _plan(job_folder(run[0], run[1], job.opts)) for run in job.runs()}
    todo = [run for run, (mode, _) in plans.items() if mode != "skip"]
    if not todo:
        return None, False
    if isinstance(job, PackJob):  # keep the configs x seeds shape: drop a config only when all its seeds are done
        job = PackJob(tuple(c for c in job.cfgs if any(run[0] == c for run in todo)), job.seeds, job.opts)
    return job, any(plans[run][1] for run in job.runs())


def _plan(path: str) -> tuple[str, bool]:
    """(what ``--resume`` does with the run folder ``path``: start, resume or skip; whether it holds a run)."""
    from .errors import RunError
    from .lifecycle import decision
    from .run_folder import RunFolder

    folder = RunFolder(path)
    try:
        return decision(folder, resume=True), folder.status() != "new"
    except RunError:  # unreadable: normkd-train reports it in one line
        return "resume", True


def launcher(nproc: int) -> list[str]:
    """The command that starts normkd-train: itself, or torchrun with ``nproc`` processes per node."""
    if nproc <= 1:
        return ["normkd-train"]
    return ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", "normkd_plugin.train"]


def command(job: Job | PackJob, nproc: int = 1, resume: bool = False, device: str = "") -> list[str]:
    """The argv that trains ``job`` (through torchrun when ``nproc`` > 1)."""
    flags = (["--resume"] if resume else []) + (["--device", device] if device else [])
    return [*launcher(nproc), *flags, *job.argv()[1:]]


def run_all(jobs: list[Job | PackJob], nproc: int = 1, device: str = "", time_limit=None) -> list[str]:
    """Run the jobs in turn (skip finished runs, resume started ones); the failures, one line each.

    With ``time_limit`` (a ``timelimit.TimeLimit``) each job gets what is left of it as its own
    ``--time-limit``; when a job stops at it or nothing is left, the sweep raises ``timelimit.Unfinished``
    (its message lists the failures so far). A stop is read from the file the job writes
    ($NORMKD_UNFINISHED_FILE), since torchrun turns its workers' exit code 3 into 1.
    """
    with _Child() as child:
        return _run_all(jobs, nproc, device, time_limit, child)


def _run_all(jobs, nproc: int, device: str, time_limit, child: _Child) -> list[str]:
    failures: list[str] = []
    elsewhere: list[tuple[Job | PackJob, str]] = []
    errors: list[tuple[int, str]] = []  # (exit code, last stderr line) of each command run
    for i, job in enumerate(jobs, 1):
        todo, started = _remaining(job)
        if todo is None:
            print(f"[{i}/{len(jobs)}] skip (finished): {job.command()}", flush=True)
            continue
        held = [(f, pid) for f in _folders(todo) if (pid := lock_holder(f)) is not None]
        if held:
            print(f"[{i}/{len(jobs)}] skip (running elsewhere, PID {held[0][1]}): {job.command()}", flush=True)
            elsewhere.append((job, job.command()))
            continue
        argv = command(todo, nproc, started, device)
        env = None
        if time_limit is not None:
            from .timelimit import UNFINISHED_FILE_ENV

            left = int(time_limit.left())  # whole seconds, rounded down
            if left < 1:
                raise _unfinished(f"before command {i} of {len(jobs)}", time_limit, failures)
            at = len(launcher(nproc))
            argv[at:at] = ["--time-limit", str(left)]
            marker = os.path.join(tempfile.mkdtemp(prefix="normkd-sweep-"), "unfinished")
            env = {**os.environ, UNFINISHED_FILE_ENV: marker}
        print(f"[{i}/{len(jobs)}] {shlex.join(argv)}", flush=True)
        module = "torch.distributed.run" if nproc > 1 else "normkd_plugin.train"  # torchrun / normkd-train
        child.last = ""
        try:
            code = launch([sys.executable, "-m", module, *argv[1:]], env)  # with this interpreter
            last = child.last
        finally:
            report = _read_report(env[UNFINISHED_FILE_ENV]) if env is not None else None
        stopped, also_failed = report is not None, report is not None and report.startswith("failed\n")
        if code == 2 and any(lock_holder(f) is not None for f in _folders(todo)):  # another sweep came first
            print(f"[{i}/{len(jobs)}] running elsewhere: {job.command()}", flush=True)
            elsewhere.append((job, job.command()))
            continue
        if code and (also_failed or not (stopped and code in (1, 3))):  # 1: torchrun's code for workers that exited 3
            failures.append(f"exit code {code}: {shlex.join(argv)}")
            errors.append((code, last))
            if len(errors) == SAME_ERROR_STOP == len(failures) and len(set(errors)) == 1 and code == 2 and last:
                raise UserError(
                    f"the first {SAME_ERROR_STOP} commands failed with the same input error; stopping here "
                    f"(fix it and run the same normkd-sweep again): {last}"
                )
            print(f"normkd-sweep: failed (exit code {code}); going on with the next", file=sys.stderr, flush=True)
        else:
            errors.append((code, last))
        if stopped:
            raise _unfinished(f"in command {i} of {len(jobs)}", time_limit, failures)
    if elsewhere:
        print(f"normkd-sweep: waiting for {len(elsewhere)} command(s) running elsewhere", file=sys.stderr, flush=True)
    for job, shown in elsewhere:
        for folder in _folders(job):
            run_files.wait_for_lock(os.path.join(folder, LOCK))
        if _remaining(job)[0] is not None:
            failures.append(f"not finished where it ran (elsewhere): {shown}")
    return failures


def _read_report(path: str) -> str | None:
    """The stop report a command left at ``path`` (its folder is removed), or None."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _unfinished(where: str, time_limit, failures: list[str]):
    from .timelimit import Unfinished

    failed = f"; {len(failures)} command(s) failed before:\n  " + "\n  ".join(failures) if failures else ""
    return Unfinished(
        f"stopped at the time limit {time_limit.describe()} {where}; "
        f"run the same normkd-sweep command again to continue{failed}"
    )


def main(argv: list[str] | None = None) -> None:
    """Print or run the grid."""
    ap = OverrideParser(
        prog="normkd-sweep",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dataset", default="cifar100")
    ap.add_argument("--methods", help="comma-separated (default: every method of the dataset, vanilla first)")
    ap.add_argument("--pairs", default="all", help="comma-separated stems, or all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--pack", action="store_true", help="group runs of one teacher into packs (one job each)")
    ap.add_argument("--pack-size", type=int, default=0, metavar="N", help="with --pack: at most N runs per pack")
    ap.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="launch each command with torchrun")
    ap.add_argument("--device", default="", help="passed to every normkd-train command (cuda or cpu)")
    ap.add_argument("--run", action="store_true", help="execute the commands one after another")
    ap.add_argument(
        "--time-limit",
        metavar="T",
        help="with --run: a budget for the whole sweep (90s, 8m, 1.5h, H:MM:SS); each command gets what is left "
        "as its --time-limit, and the sweep exits 3 when it is spent (run it again to continue); "
        "without --run: passed to every command",
    )
    ap.add_argument("opts", nargs="*", metavar="KEY VALUE", help="KEY VALUE overrides passed to every run")
    args = parse_with_overrides(ap, argv)  # flags may also follow the overrides, as in normkd-train
    try:
        if args.key_without_value is not None:
            raise ValueError(
                f"command-line override {args.key_without_value} has no VALUE; overrides are KEY VALUE pairs"
            )
        from .config import parse_seeds
        from .config_rules import batch_source

        seeds = parse_seeds(args.seeds)
        chosen = split_names(args.methods) if args.methods is not None else list(dataset_methods(args.dataset))
        jobs = grid(args.dataset, chosen, split_names(args.pairs), seeds, list(args.opts))
        if args.pack:
            implied = "fast" if args.dataset == "cifar100" else "ddp"
            trainer = dict(zip(args.opts[::2], args.opts[1::2])).get("SOLVER.TRAINER", implied)
            allowed = ("fast", "ddp") if args.dataset == "cifar100" else ("ddp",)
            if trainer not in allowed and not (trainer == "base" and args.nproc_per_node > 1):
                raise ValueError(
                    f"--pack trains with SOLVER.TRAINER {' or '.join(allowed)} (or base under --nproc-per-node > 1), "
                    f"not {trainer!r}"
                )
            jobs = packs(jobs, args.pack_size, implied)
        time_limit = None
        if args.time_limit is not None:
            from .timelimit import TimeLimit, parse_duration

            time_limit = TimeLimit(parse_duration(args.time_limit))
            given = dict(zip(args.opts[::2], args.opts[1::2]))
            trainer = given.get("SOLVER.TRAINER", "fast" if args.pack else "base")
            if batch_source(trainer, given.get("DATASET.DECODE", "host"), args.nproc_per_node) is None:
                raise ValueError(
                    f"--time-limit: SOLVER.TRAINER {trainer!r} is mdistiller's trainer, whose epoch loop cannot stop "
                    "early; add SOLVER.TRAINER fast (or ddp)"
                )
    except ValueError as exc:
        print(f"normkd-sweep: {exc}", file=sys.stderr)
        sys.exit(2)
    if not args.run:
        given = ["--time-limit", args.time_limit] if args.time_limit is not None else []
        with quiet_pipe():
            for job in jobs:
                argv = command(job, args.nproc_per_node, device=args.device)
                argv[len(launcher(args.nproc_per_node)) : len(launcher(args.nproc_per_node))] = given
                print(shlex.join(argv))
        return
    from .timelimit import EXIT_UNFINISHED, Unfinished

    try:
        with user_errors("normkd-sweep"):
            failures = run_all(jobs, args.nproc_per_node, args.device, time_limit)
    except Unfinished as exc:
        print(f"normkd-sweep: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNFINISHED)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"normkd-sweep: interrupted by signal {signum}; the command running stopped after its last committed "
            "epoch; run the same normkd-sweep again to continue",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
    if failures:
        sys.exit(f"normkd-sweep: {len(failures)} of {len(jobs)} commands failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
