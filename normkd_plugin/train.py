"""normkd-train: mdistiller's tools/train.py command line, with the plugins registered.

normkd-train --cfg cifar100/normkd/res32x4_res8x4 [--resume] [--device cpu] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

log = logging.getLogger("normkd_plugin.train")

HOST_CUDA_TRAINERS = ("base", "crd", "dot", "crd_dot")

EPILOG = """examples:
  normkd-train --cfg cifar100/normkd/res32x4_res8x4
  normkd-train --cfg cifar100/normdkd/res56_res20 DATASET.ROOT ../shared/data/cifar100 \\
      DISTILLER.TEACHER_CKPT ../shared/data/teachers/cifar100/resnet56-f2eff4c8.pt EXPERIMENT.SEED 0
  normkd-train --cfg my_kd.yaml SOLVER.TRAINER fast SOLVER.AMP True
  normkd-train --list-distillers
"""


def parser() -> argparse.ArgumentParser:
    """The command line of mdistiller's tools/train.py plus --device and --list-distillers."""
    p = argparse.ArgumentParser(
        prog="normkd-train",
        description="Train a distiller with mdistiller's trainers (plugins registered).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cfg", default="", help="config file, or a packaged name such as cifar100/normkd/res56_res20")
    p.add_argument("--resume", action="store_true", help="continue from <run folder>/latest")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--list-distillers", action="store_true", help="print registered plugins and exit")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="space-separated PATH.KEY VALUE pairs")
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


def main(argv: list[str] | None = None) -> None:
    """Parse, load and validate the config, build everything with the host's pieces, train."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if args.list_distillers:
        _list_distillers()
        return
    if not args.cfg:
        parser().error("--cfg is required")

    from .config import ConfigError, load_config, run_name

    opts = list(args.opts)
    try:
        cfg = load_config(args.cfg, opts)
    except ConfigError as exc:
        sys.exit(f"normkd-train: {exc}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.SOLVER.TRAINER in HOST_CUDA_TRAINERS and device.type != "cuda":
        sys.exit(
            f"normkd-train: SOLVER.TRAINER {cfg.SOLVER.TRAINER!r} is mdistiller's trainer, which moves every "
            "batch to CUDA, and no CUDA device is available. Use a GPU machine, or train on the CPU "
            "with SOLVER.TRAINER fast --device cpu."
        )
    if cfg.LOG.WANDB and not _wandb_available():
        log.warning("LOG.WANDB is on but wandb is not installed; logging to tensorboard and worklog.txt only")
        cfg.defrost()
        cfg.LOG.WANDB = False
        cfg.freeze()
    train(cfg, run_name(cfg, opts), device, args.resume)


def train(cfg, experiment_name: str, device: torch.device, resume: bool = False):
    """One run: ``fast`` as a pack of one; the host's trainers with the folder locked and guarded."""
    if cfg.SOLVER.TRAINER == "fast":
        return train_pack([cfg], [experiment_name], device, resume)
    from .ddp_trainer import train_ddp, wants_ddp

    if wants_ddp(cfg):  # torchrun + DistributedDataParallel (also SOLVER.TRAINER ddp, DATASET.DECODE gpu|cpu)
        return train_ddp(cfg, experiment_name, device, resume)
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import show_cfg

    from .build import build_distiller, build_models
    from .checkpoints import allow_release_types
    from .data import get_dataset, seed_everything
    from .runs import CONFIG, RunFolder

    folder = RunFolder(os.path.join(cfg.LOG.PREFIX, experiment_name))
    folder.lock()
    try:
        if not folder.check_start(resume):
            return None
        if cfg.EXPERIMENT.SEED >= 0:
            seed_everything(cfg.EXPERIMENT.SEED)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.EXPERIMENT.SEED < 0
        _init_wandb(cfg, experiment_name)
        show_cfg(cfg)
        train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
        student, teacher = build_models(cfg, num_classes)
        distiller = build_distiller(cfg, student, teacher, num_data)
        distiller = torch.nn.DataParallel(distiller.to(device))
        if not resume:
            folder.write_text(CONFIG, cfg.dump())
        trainer = trainer_dict[cfg.SOLVER.TRAINER](experiment_name, distiller, train_loader, val_loader, cfg)
        with allow_release_types():  # the host's --resume reads numpy floats from its own checkpoints
            trainer.train(resume=resume)
        return trainer
    finally:
        folder.unlock()


def _init_wandb(cfg, experiment_name: str) -> None:
    if cfg.LOG.WANDB:
        import wandb

        wandb.init(project=cfg.EXPERIMENT.PROJECT, name=experiment_name, tags=cfg.EXPERIMENT.TAG.split(","))


def train_pack(cfgs: list, names: list[str], device: torch.device, resume: bool = False):
    """Runs of one teacher trained together by the ``fast`` engine; each as it would train alone.

    Order (the same for a pack of one): check the pack, lock and guard every run folder, load the
    data and the teacher once, then per run seed the global RNG and build its student and distiller.
    """
    from tensorboardX import SummaryWriter

    from .build import build_distiller, build_student, build_teacher
    from .data import get_dataset, seed_everything
    from .fast.pack import Pack, PackRun, SharedTeacher, check_pack, data_seed, host_optimizer
    from .fast.trainer import tensor_split
    from .runs import RunFolder

    check_pack(cfgs, names)
    folders = [RunFolder(os.path.join(cfg.LOG.PREFIX, name)) for cfg, name in zip(cfgs, names)]
    try:
        for folder in folders:
            folder.lock()
        todo = [(c, n, f) for c, n, f in zip(cfgs, names, folders) if f.check_start(resume)]
        if not todo:
            return None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = all(cfg.EXPERIMENT.SEED < 0 for cfg, _, _ in todo)
        train_loader, val_loader, num_data, num_classes = get_dataset(todo[0][0])
        teacher_cfg = next((cfg for cfg, _, _ in todo if cfg.DISTILLER.TYPE != "NONE"), None)
        teacher = None
        if teacher_cfg is not None:
            teacher = SharedTeacher(build_teacher(teacher_cfg, num_classes)).to(device)
        runs = []
        for cfg, name, folder in todo:
            if cfg.EXPERIMENT.SEED >= 0:
                seed_everything(cfg.EXPERIMENT.SEED)
            student = build_student(cfg, num_classes)
            distiller = build_distiller(cfg, student, teacher if cfg.DISTILLER.TYPE != "NONE" else None, num_data)
            distiller.to(device)
            _init_wandb(cfg, name)
            runs.append(
                PackRun(
                    name=name,
                    cfg=cfg,
                    folder=folder,
                    distiller=distiller,
                    optimizer=host_optimizer(cfg, distiller),
                    seed=data_seed(cfg),
                    writer=SummaryWriter(os.path.join(folder.path, "train.events")),
                )
            )
        train_data = tensor_split(train_loader, "train", device)
        pack = Pack(runs, train_data, tensor_split(val_loader, "validation", device), teacher)
        return pack.train(resume)
    finally:
        for folder in folders:
            folder.unlock()


if __name__ == "__main__":
    main()
