"""normkd-train: mdistiller's tools/train.py command line, with the plugins registered.

normkd-train --cfg cifar100/normkd/res32x4_res8x4 [--resume] [--device cpu] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._cli import OverrideParser

if TYPE_CHECKING:
    import torch

log = logging.getLogger("normkd_plugin.train")

HOST_CUDA_TRAINERS = ("base", "crd", "dot", "crd_dot")

EPILOG = """examples:
  normkd-train --cfg cifar100/normkd/res32x4_res8x4
  normkd-train --cfg cifar100/normdkd/res56_res20 DATASET.ROOT DIR DISTILLER.TEACHER_CKPT FILE EXPERIMENT.SEED 0
  normkd-train --cfg my_kd.yaml SOLVER.TRAINER fast SOLVER.AMP True
  normkd-train --cfg cifar100/kd/res56_res20 --cfg cifar100/normkd/res56_res20 --seeds 0,1,2 SOLVER.TRAINER fast
  normkd-train --cfg cifar100/normkd/res56_res20 SOLVER.TRAINER fast --time-limit 3:50:00 --resume
  normkd-train --list-distillers

exit status: 0 done; 2 input error or failed run (one line on stderr); 3 stopped by --time-limit;
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM after the last committed epoch
(every run continues exactly with --resume; the same command with --resume also starts the job)
"""


def parser() -> argparse.ArgumentParser:
    """The command line of mdistiller's tools/train.py plus --device, --debug and --list-distillers.

    Flags may stand before, between or after the KEY VALUE overrides (see ``_cli.parse_with_overrides``).
    """
    p = OverrideParser(
        prog="normkd-train",
        description="Train a distiller with mdistiller's trainers (plugins registered).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cfg",
        action="append",
        default=[],
        help="config file, or a packaged name such as cifar100/normkd/res56_res20; "
        "repeat it to train several configs together in one process (a pack)",
    )
    p.add_argument(
        "--seeds",
        default="",
        metavar="S1,S2,...",
        help="train every --cfg once per seed (EXPERIMENT.SEED), all in one pack",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume or start: continue each run from <run folder>/latest, start a run that has nothing to "
        "resume, leave a finished one as it is (so the same command starts a job, continues it after a kill "
        "or a --time-limit stop, and does nothing once it is done)",
    )
    p.add_argument(
        "--time-limit",
        default=None,
        metavar="T",
        help="start an epoch only if it should end within T (90s, 8m, 1.5h, H:MM:SS) of the job's start; "
        "then exit 3 and continue later with --resume (SOLVER.TRAINER fast or ddp)",
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda; without a GPU, give --device cpu)"
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    p.add_argument("--list-distillers", action="store_true", help="print registered plugins and exit")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="space-separated PATH.KEY VALUE pairs")
    return p


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _list_distillers() -> None:
    from . import register

    for plugin in register():
        print(f"{plugin.group:24s} {plugin.name:14s} {plugin.distribution} {plugin.version}  ({plugin.value})")


def _seeded(opts: list[str], seeds: str) -> list[list[str]]:
    """The override list of each seed of ``--seeds`` (just ``opts`` without the flag)."""
    from .config import ConfigError, parse_seeds

    if not seeds:
        return [list(opts)]
    if "EXPERIMENT.SEED" in opts[::2]:
        raise ConfigError("give the seeds either with --seeds or with EXPERIMENT.SEED, not both")
    return [[*opts, "EXPERIMENT.SEED", str(seed)] for seed in parse_seeds(seeds)]


def _how_far(lives: list) -> str:
    """Where a stop left the runs of this command (``lives``), and how to go on (the line after 'interrupted')."""
    epochs = sorted({life.epoch for life in lives if life.epoch is not None})
    if not epochs:
        return "before this process committed an epoch; run the same command again (with --resume once the run has one)"
    at = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]} (by run)"
    return f"after {at}; --resume continues"


def main(argv: list[str] | None = None, hooks: Sequence = ()) -> None:
    """Parse, load and validate the config(s), build everything with the host's pieces, train.

    An input error (config, data, checkpoint, run folder) prints one line and exits 2. ``hooks``
    (``engine.fit.Hook``) join the engine's own around every epoch of the runs it trains.
    """
    from ._cli import parse_with_overrides, stop_signals, user_errors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = parser()
    args = parse_with_overrides(p, sys.argv[1:] if argv is None else argv)
    if args.list_distillers:
        _list_distillers()
        return
    if not args.cfg:
        p.error("--cfg is required")
    lives: list = []  # the runs this command decided, for the line a stop prints
    with user_errors(p.prog, args.debug), stop_signals(p.prog, functools.partial(_how_far, lives), args.debug):
        from .config import ConfigError, resolve_config
        from .timelimit import EXIT_UNFINISHED, TimeLimit, Unfinished, parse_duration, report_unfinished

        # What needs neither torch nor mdistiller is checked first: a typo is refused at once.
        time_limit = TimeLimit(parse_duration(args.time_limit)) if args.time_limit is not None else None
        runs = [(name, opts) for name in args.cfg for opts in _seeded(args.opts, args.seeds)]
        for name in args.cfg:
            resolve_config(name)
        if args.key_without_value is not None:
            raise ConfigError(
                f"command-line override {args.key_without_value} has no VALUE; overrides are KEY VALUE pairs"
            )

        import torch

        from .config import load_config, run_folder_path, run_name

        quiet_host_warnings()
        cfgs = [load_config(name, opts) for name, opts in runs]
        names = [run_name(cfg, opts) for cfg, (_, opts) in zip(cfgs, runs)]
        folders = {}
        for (given, _), cfg, name in zip(runs, cfgs, names):
            folder = run_folder_path(cfg, name)
            if folder in folders:
                raise ConfigError(f"--cfg {folders[folder]} and --cfg {given} would write the same run folder {folder}")
            folders[folder] = given
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as exc:
            raise ConfigError(f"--device {args.device!r}: {exc}; expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device is available; use --device cpu")
        from .engine.source import uses_engine

        for cfg in cfgs:
            engine = uses_engine(cfg)  # this plugin's engine, not one of the host's trainers
            if time_limit is not None and not engine:
                raise ConfigError(
                    f"--time-limit: SOLVER.TRAINER {cfg.SOLVER.TRAINER!r} is mdistiller's trainer, whose epoch loop "
                    "cannot stop early; use SOLVER.TRAINER fast or ddp (or end the job with a kill: --resume "
                    "continues from the last finished epoch)"
                )
            if cfg.SOLVER.TRAINER in HOST_CUDA_TRAINERS and device.type != "cuda" and not engine:
                why = f"--device {device} was asked" if torch.cuda.is_available() else "no CUDA device is available"
                raise ConfigError(
                    f"SOLVER.TRAINER {cfg.SOLVER.TRAINER!r} is mdistiller's trainer, which moves every "
                    f"batch to CUDA, and {why}. Use a GPU machine, or train on the CPU "
                    "with SOLVER.TRAINER fast (or ddp) --device cpu."
                )
            if cfg.LOG.WANDB and not _wandb_available():
                log.warning("LOG.WANDB is on but wandb is not installed; logging to tensorboard and worklog.txt only")
                cfg.defrost()
                cfg.LOG.WANDB = False
                cfg.freeze()
        if args.device is None and device.type == "cpu":  # a GPU job on the wrong machine would take days
            epochs = max(int(cfg.SOLVER.EPOCHS) for cfg in cfgs)
            raise ConfigError(
                f"no CUDA device is available; add --device cpu to train the {epochs} epoch(s) on the CPU on purpose"
            )
        from .errors import RunsFailed

        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one line for the job
        try:
            if len(cfgs) == 1:
                train(cfgs[0], names[0], device, args.resume, time_limit, hooks, lives)
            else:
                train_pack(cfgs, names, device, args.resume, time_limit, hooks, lives)
        except Unfinished as exc:
            if main_rank:
                report_unfinished(str(exc))
                print(f"{p.prog}: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_UNFINISHED) from None
        except RunsFailed as exc:
            if exc.unfinished and main_rank:
                report_unfinished(exc.unfinished, failed=True)
            raise


def quiet_host_warnings() -> None:
    """Hide the deprecation warning mdistiller's own DKD loss (``size_average=``) prints in every run using it."""
    warnings.filterwarnings("ignore", message="size_average and reduce args will be deprecated", category=UserWarning)


def train(cfg, experiment_name: str, device: torch.device, resume: bool = False, time_limit=None, hooks=(), lives=None):
    """One run: ``fast``, ``ddp`` (and ``base`` under torchrun or with DATASET.DECODE) as a pack of one of this
    plugin's engine; the host's other trainers with the folder locked and guarded.

    ``time_limit`` (a ``timelimit.TimeLimit``, this engine only) may end training early with ``Unfinished``;
    ``hooks`` join the engine's; ``lives`` (a list) receives the run's ``RunLife``.
    """
    from .engine.source import uses_engine

    if uses_engine(cfg):
        return train_pack([cfg], [experiment_name], device, resume, time_limit, hooks, lives)
    if time_limit is not None:
        raise ValueError(f"time_limit needs SOLVER.TRAINER fast or ddp, not {cfg.SOLVER.TRAINER!r}")
    import torch
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import show_cfg

    from .build import build_distiller, build_models
    from .checkpoints import allow_release_types
    from .data import get_dataset, seed_run
    from .imagenet import check_class_folders
    from .lifecycle import RunLife, decide_all
    from .provenance import learned_from
    from .run_folder import RunFolder

    life = RunLife(RunFolder(os.path.join(cfg.LOG.PREFIX, experiment_name), experiment_name, cfg.dump()), resume)
    if lives is not None:
        lives.append(life)
    try:
        if decide_all([life]) == ["skip"]:
            return None
        life.resume_or_start(load=False)  # mdistiller's trainer loads its own latest
        resume = life.mode == "resume"  # a run without a checkpoint starts again
        seed_run(cfg, device)
        _init_wandb(cfg, experiment_name)
        show_cfg(cfg)
        train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
        check_class_folders(train_loader.dataset, val_loader.dataset)
        student, teacher = build_models(cfg, num_classes)
        life.folder.learn_from(learned_from(cfg, train_loader.dataset, val_loader.dataset), resume)
        distiller = build_distiller(cfg, student, teacher, num_data)
        distiller = torch.nn.DataParallel(distiller.to(device))
        trainer = trainer_dict[cfg.SOLVER.TRAINER](experiment_name, distiller, train_loader, val_loader, cfg)
        with run_paths([life]), allow_release_types():  # the host's --resume reads numpy floats
            if resume:
                _cut_to_host_latest(life.folder)
            trainer.train(resume=resume)
        return trainer
    finally:
        life.close()


def _cut_to_host_latest(folder) -> None:
    """Before mdistiller's trainer resumes from ``latest``: the worklog keeps the epochs up to latest's only.

    The host writes an epoch's block before its checkpoint and appends ``best_acc`` after its loop, so a run
    killed between the two writes, or resumed once finished, would otherwise log an epoch or its end twice."""
    import torch

    try:
        epoch = int(torch.load(os.path.join(folder.path, "latest"), map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # the host's own load of latest says what is wrong with it
        return
    folder.cut_worklog(epoch)


@contextmanager
def run_paths(lives: list) -> Iterator[None]:
    """Log each run folder's full path as its run starts (or resumes) and again as the block ends: finished,
    failed or unfinished."""
    paths = [os.path.abspath(life.folder.path) for life in lives]
    for path, life in zip(paths, lives):
        log.info("run %s: %s", "resumes" if life.mode == "resume" else "starts", path)
    try:
        yield
    finally:
        for life, path in zip(lives, paths):
            log.info("run %s: %s", _outcome(life.folder), path)


def _outcome(folder) -> str:
    """'finished', 'failed' or 'ended unfinished', read from the run folder's worklog."""
    from .errors import UserError

    try:
        status = folder.status()
    except UserError:  # an unreadable worklog: the error that ended the run says more
        status = ""
    return status if status in ("finished", "failed") else "ended unfinished"


def _init_wandb(cfg, experiment_name: str) -> None:
    if cfg.LOG.WANDB:
        import wandb

        wandb.init(project=cfg.EXPERIMENT.PROJECT, name=experiment_name, tags=cfg.EXPERIMENT.TAG.split(","))


def train_pack(
    cfgs: list, names: list[str], device: torch.device, resume: bool = False, time_limit=None, hooks=(), lives=None
):
    """Runs of one teacher trained together by this plugin's engine (``engine/``); each as it would train alone.

    Under torchrun every rank trains its share of each global batch (``distributed.Ranks``). The pack is
    checked, and every run folder locked (by rank 0) and decided, before anything is built.
    """
    from . import distributed
    from .build import build_pack
    from .engine.checks import check_pack
    from .engine.fit import train_runs
    from .lifecycle import RunLife, decide_all
    from .run_folder import RunFolder

    check_pack(cfgs, names, device)
    with distributed.job(cfgs, device) as device:
        main = distributed.is_main()
        mine = [
            RunLife(RunFolder(os.path.join(c.LOG.PREFIX, n), n, c.dump()), resume, main) for c, n in zip(cfgs, names)
        ]
        if lives is not None:
            lives.extend(mine)
        try:
            decide_all(mine)  # before anything is built; --resume also starts new runs
            todo = [(c, n, life) for c, n, life in zip(cfgs, names, mine) if life.mode != "skip"]
            if not todo:
                return None
            if main:
                for cfg, name, _ in todo:
                    _init_wandb(cfg, name)
            todo_cfgs, todo_names, todo_lives = map(list, zip(*todo))
            pack = build_pack(todo_cfgs, todo_names, [life.folder for life in todo_lives], device)
            with run_paths(todo_lives if main else []):  # rank 0 speaks
                return train_runs(pack, todo_lives, time_limit, hooks)
        finally:
            for life in mine:
                life.close()


if __name__ == "__main__":
    main()
