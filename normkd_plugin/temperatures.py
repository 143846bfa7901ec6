"""normkd-temperatures PAIR: the per-sample temperatures NormKD gives a teacher's (and a student's) logits.

    normkd-temperatures res56_res20 DATASET.ROOT DIR DISTILLER.TEACHER_CKPT FILE [--png hist.png] [--json out.json]
    normkd-temperatures res32x4_res8x4 --student-ckpt output/.../student_best --split train --device cuda

The teacher of PAIR (and with --student-ckpt a trained student of the pair) runs over a CIFAR-100
split, normalised as the host normalises its test images, without augmentation. For each image n,
σ_n is the unbiased standard deviation of its logit vector over the classes and T_n = T_norm·σ_n its
NormKD temperature (T_norm from the pair's packaged NormKD config, or a NORMKD.TEMPERATURE_NORM
override). The command prints their distribution (mean, std, percentiles, by class) and each
sample's KL weight, the factor its KL divergence enters the loss with: NormKD's KD_WEIGHT·T_n²
(per sample) against KD's KD_WEIGHT·T² and logit standardization's (KD+LS) λ·τ² (constants), all at
the pair's packaged settings; KD+LS's are LSKD's README defaults (τ 2, λ 9) where the pair has no
packaged kd_ls config. With τ = T_norm, KD+LS and NormKD soften the logits alike, so that weight is
all that sets them apart.

KEY VALUE overrides apply to the pair's packaged NormKD config, as with normkd-train: DATASET.ROOT
(default: mdistiller's data folder, never downloaded into), DISTILLER.TEACHER_CKPT (default:
mdistiller's path for the teacher). An unknown pair, a missing checkpoint or data folder, or a bad
override prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._cli import OverrideParser, parse_with_overrides, quiet_pipe, user_errors
from .errors import UserError
from .pairs import PAIRS, Pair

if TYPE_CHECKING:
    from .temperatures_report import Model

__all__ = [
    "PERCENTILES",
    "LSKD_DEFAULTS",
    "Summary",
    "Settings",
    "find",
    "logit_std",
    "summarize",
    "per_class_mean",
    "pair_settings",
    "kl_weights",
    "logits",
    "main",
]

PERCENTILES = (10, 25, 50, 75, 90)
LSKD_DEFAULTS = (2.0, 9.0)  # (τ, λ): logit-standardization-KD's README defaults for a pair it gives none for


class TemperatureError(UserError, ValueError):
    """A pair, split or flag normkd-temperatures cannot use; the message names it."""


def find(name: str) -> Pair:
    """The pair named ``stem`` or ``dataset/stem`` (res56_res20, cifar100/res56_res20); TemperatureError otherwise."""
    names = {f"{p.dataset}/{p.stem}": p for p in PAIRS}
    found = names.get(name) or [p for p in PAIRS if p.stem == name]
    if isinstance(found, Pair):
        return found
    if len(found) == 1:
        return found[0]
    near = difflib.get_close_matches(name, [p.stem for p in PAIRS] + list(names), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}?" if near else f"choose from {', '.join(p.stem for p in PAIRS)}"
    raise TemperatureError(f"pair {name!r} is not a pair of the benchmark; {hint}")


def config_name(pair: Pair, method: str) -> str:
    """The packaged config of ``method`` (normkd, kd, kd_ls, ...) for ``pair``: cifar100/kd/res56_res20, imagenet/r34_r18/kd."""
    return (
        f"{pair.dataset}/{method}/{pair.stem}" if pair.dataset == "cifar100" else f"{pair.dataset}/{pair.stem}/{method}"
    )


def logit_std(logits: Tensor) -> Tensor:
    """σ_n = sqrt(Σ_c (z_nc − mean_c z_nc)² / (C − 1)), in float64, one per row of ``logits`` (N, C)."""
    return logits.double().std(dim=1)


@dataclass(frozen=True)
class Summary:
    """Mean, sample std, min, max and the PERCENTILES (linear interpolation, numpy's default) of some values."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[int, float]

    def cells(self) -> list[float]:
        """mean, std, min, the percentiles, max: one table row."""
        return [self.mean, self.std, self.min, *self.percentiles.values(), self.max]


def summarize(values: Tensor) -> Summary:
    """Summary of a 1-D tensor (computed in float64)."""
    v = values.double().flatten()
    q = torch.quantile(v, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    std = float(v.std()) if v.numel() > 1 else 0.0
    return Summary(v.numel(), float(v.mean()), std, float(v.min()), float(v.max()), dict(zip(PERCENTILES, q.tolist())))


def per_class_mean(values: Tensor, labels: Tensor, classes: int) -> list[float | None]:
    """The mean of ``values`` over the samples of each label 0..classes-1 (None for a class with none)."""
    v, y = values.double(), labels.long()
    total = torch.zeros(classes, dtype=torch.float64).index_add_(0, y, v)
    count = torch.bincount(y, minlength=classes)
    return [float(t / c) if c else None for t, c in zip(total, count)]


@dataclass(frozen=True)
class Settings:
    """The pair's packaged KL settings: NormKD's T_norm and KD weight, KD's T and weight, KD+LS's τ and λ."""

    t_norm: float
    normkd_weight: float
    normkd_source: str
    kd_temperature: float
    kd_weight: float
    kd_source: str
    ls_tau: float
    ls_weight: float
    ls_source: str


def _packaged(name: str) -> dict | None:
    """The packaged config ``name`` as a dict, or None when the package has no such config."""
    from .config import ConfigError, read_yaml_config, resolve_config

    try:
        return read_yaml_config(resolve_config(name))
    except ConfigError:
        return None


def _key(data: dict, dotted: str, source: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise TemperatureError(f"packaged config {source} has no {dotted}")
        node = node[part]
    return float(node)


def pair_settings(
    pair: Pair, read=_packaged, t_norm: float | None = None, normkd_weight: float | None = None
) -> Settings:
    """Settings from the packaged normkd, kd and kd_ls configs of ``pair`` (``read(name) -> dict | None``); without a
    kd_ls config, LSKD_DEFAULTS. ``t_norm``/``normkd_weight`` replace the packaged NormKD values (overrides)."""
    names = {m: config_name(pair, m) for m in ("normkd", "kd", "kd_ls")}
    found = {m: read(name) for m, name in names.items()}
    for m in ("normkd", "kd"):
        if found[m] is None:
            raise TemperatureError(f"the package has no config {names[m]}")
    normkd, kd, ls = found["normkd"], found["kd"], found["kd_ls"]
    if ls is None:
        tau, lam = LSKD_DEFAULTS
        ls_source = f"LSKD's README defaults: the package has no {names['kd_ls']}"
    else:
        tau, lam = _key(ls, "KD_LS.TEMPERATURE", names["kd_ls"]), _key(ls, "KD_LS.LOSS.KD_WEIGHT", names["kd_ls"])
        ls_source = names["kd_ls"]
    return Settings(
        t_norm=_key(normkd, "NORMKD.TEMPERATURE_NORM", names["normkd"]) if t_norm is None else float(t_norm),
        normkd_weight=_key(normkd, "NORMKD.LOSS.KD_WEIGHT", names["normkd"])
        if normkd_weight is None
        else float(normkd_weight),
        normkd_source=names["normkd"],
        kd_temperature=_key(kd, "KD.TEMPERATURE", names["kd"]),
        kd_weight=_key(kd, "KD.LOSS.KD_WEIGHT", names["kd"]),
        kd_source=names["kd"],
        ls_tau=tau,
        ls_weight=lam,
        ls_source=ls_source,
    )


def kl_weights(sigma: Tensor, s: Settings) -> tuple[Tensor, float, float]:
    """(NormKD's per-sample KD_WEIGHT·(T_norm·σ_n)², KD's KD_WEIGHT·T², KD+LS's λ·τ²), in float64."""
    normkd = s.normkd_weight * (s.t_norm * sigma.double()) ** 2
    return normkd, s.kd_weight * s.kd_temperature**2, s.ls_weight * s.ls_tau**2


@torch.inference_mode()
def logits(model: torch.nn.Module, images: Tensor, normalize, device: torch.device, batch_size: int) -> Tensor:
    """The model's logits (float32, on the CPU) for uint8 NCHW ``images``, normalised in batches on ``device``."""
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i : i + batch_size].to(device))
        z = model(x)
        out.append((z[0] if isinstance(z, tuple) else z).float().cpu())
    return torch.cat(out)


# ---- the command --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = OverrideParser(
        prog="normkd-temperatures",
        usage="%(prog)s PAIR [--student-ckpt FILE] [--split test|train] [--device D] [--png FILE] [--json FILE] "
        "[--per-class] [KEY VALUE ...]",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--student-ckpt", metavar="FILE", help="a student of the pair (student_best, student_latest, ...)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="CIFAR-100 split (default test)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    p.add_argument("--png", metavar="FILE", help="write histograms of σ and of the per-sample KL weight")
    p.add_argument("--json", metavar="FILE", help="write every number (per-class means included) as JSON")
    p.add_argument("--per-class", action="store_true", help="print the mean σ of every class, not only the extremes")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    return p


def _device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise TemperatureError(f"--device {name!r}: {exc}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TemperatureError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device


def _student(cfg, path: str, classes: int) -> torch.nn.Module:
    from .build import build_student
    from .checkpoints import load_weights

    student = build_student(cfg, classes)
    load_weights(student, path, f"student {cfg.DISTILLER.STUDENT!r}", f"--student-ckpt {path}: no such file")
    return student


def _measure(name: str, arch: str, checkpoint: str, z: Tensor, labels: Tensor, t_norm: float) -> tuple[Model, Tensor]:
    from .temperatures_report import Model

    sigma = logit_std(z)
    top1 = float((z.argmax(1) == labels).double().mean()) * 100
    per_class = per_class_mean(sigma, labels, z.shape[1])
    return Model(name, arch, checkpoint, top1, summarize(sigma), summarize(t_norm * sigma), per_class), sigma


def _run(args, prog: str) -> None:
    from .config import load_config
    from .data import host_data_folder, load_cifar100
    from .temperatures_report import figure, report

    pair = find(args.pair)
    if pair.dataset != "cifar100":
        raise TemperatureError(f"pair {args.pair!r} is an {pair.dataset} pair; {prog} runs CIFAR-100 pairs only")
    if args.batch_size < 1:
        raise TemperatureError(f"--batch-size {args.batch_size}: expected a positive number of images")
    if args.png and importlib.util.find_spec("matplotlib") is None:
        raise TemperatureError(f'--png {args.png}: plots need matplotlib: pip install "normkd-plugin[plot]"')
    for flag in ("png", "json"):
        path = getattr(args, flag)
        if path and not Path(path).expanduser().absolute().parent.is_dir():
            raise TemperatureError(f"--{flag} {path}: no such folder {Path(path).expanduser().absolute().parent}")
    device = _device(args.device)
    cfg = load_config(config_name(pair, "normkd"), args.opts)
    s = pair_settings(pair, t_norm=cfg.NORMKD.TEMPERATURE_NORM, normkd_weight=cfg.NORMKD.LOSS.KD_WEIGHT)

    from mdistiller.dataset.cifar100 import get_cifar100_test_transform
    from mdistiller.models import cifar_model_dict

    from .build import build_teacher
    from .checkpoints import teacher_checkpoint_path
    from .engine.augment import TensorCifar, host_pipeline

    classes = 100
    teacher = build_teacher(cfg, classes).to(device)  # the same loading (and errors) as normkd-train's
    student = _student(cfg, args.student_ckpt, classes).to(device) if args.student_ckpt else None
    ckpt = teacher_checkpoint_path(cfg, cifar_model_dict[cfg.DISTILLER.TEACHER][1])
    images, labels = load_cifar100(cfg.DATASET.ROOT or host_data_folder(), args.split == "train")
    # ToTensor + Normalize of the host's test transform, on whole batches (uint8 split kept on the CPU)
    split = TensorCifar(images, labels, host_pipeline(get_cifar100_test_transform()), torch.device("cpu"))
    labels = split.targets
    models, sigmas = [], {}
    for name, net, path in (("teacher", teacher, ckpt), ("student", student, args.student_ckpt)):
        if net is None:
            continue
        z = logits(net, split.images, split.normalize, device, args.batch_size)
        model, sigma = _measure(name, getattr(cfg.DISTILLER, name.upper()), path, z, labels, s.t_norm)
        models.append(model)
        sigmas[f"{name} {model.arch}"] = sigma
    normkd_w, kd_w, ls_w = kl_weights(next(iter(sigmas.values())), s)
    weight = summarize(normkd_w)
    with quiet_pipe():
        sys.stdout.write(report(pair, args.split, models, s, weight, kd_w, ls_w, args.per_class))
    if args.json:
        out = {
            "pair": f"{pair.dataset}/{pair.stem}",
            "split": args.split,
            "settings": asdict(s),
            "models": [asdict(m) for m in models],
            "kl_weight": {"normkd": asdict(weight), "kd": kd_w, "kd_ls": ls_w},
        }
        Path(args.json).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    if args.png:
        import matplotlib.pyplot as plt

        fig = figure(pair, args.split, sigmas, normkd_w, kd_w, ls_w, s)
        fig.savefig(Path(args.png).expanduser(), dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the pair's teacher (and student) over the split; print σ, T_n and the KL weights; write PNG/JSON."""
    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pair = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args = parse_with_overrides(p, argv)  # flags anywhere, the other tokens KEY VALUE pairs
    if pair is None:
        p.error("PAIR comes first: a pair of the benchmark such as res56_res20 (then flags and KEY VALUE overrides)")
    args.pair = pair
    with user_errors(p.prog, args.debug):
        _run(args, p.prog)


if __name__ == "__main__":
    main()
