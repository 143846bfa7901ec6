"""The benchmark's teacher-student pairs (mdistiller model keys, config stems, per-pair settings)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Pair", "PAIRS", "METHODS", "COMPARISON", "methods", "find_pair"]

METHODS = ("kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")
"""Methods with a packaged config for every pair."""

COMPARISON = ("vanilla", "kd", "dkd", "kd_ls", "dkd_ls", "normkd", "normdkd")
"""The comparison of one pair, in table order: the student alone, then each method (vanilla: CIFAR-100 only)."""


@dataclass(frozen=True)
class Pair:
    """One teacher -> student pair and the hyperparameters that differ between pairs."""

    dataset: str
    stem: str  # config file stem (CIFAR-100) or folder (ImageNet)
    teacher: str  # mdistiller model key
    student: str
    teacher_tag: str  # short names used in EXPERIMENT.TAG, as mdistiller's own configs do
    student_tag: str
    lr: float
    dkd_beta: float
    normdkd_alpha: float
    normdkd_beta: float
    # LSKD (logit standardization): KD+LS (base temperature, KD weight), DKD+LS (base temperature, KD weight,
    # DKD beta before the KD weight multiplies it), from its released logs' file names; README default (2, 9) if none.
    kd_ls: tuple[float, float] = (2.0, 9.0)
    dkd_ls: tuple[float, float, float] = (2.0, 9.0, 8.0)


def _c(stem, teacher, student, t_tag, s_tag, lr, dkd_beta, alpha, beta, kd_ls, dkd_ls) -> Pair:
    return Pair("cifar100", stem, teacher, student, t_tag, s_tag, lr, dkd_beta, alpha, beta, kd_ls, dkd_ls)


PAIRS: tuple[Pair, ...] = (
    _c("res56_res20", "resnet56", "resnet20", "res56", "res20", 0.05, 2.0, 7.0, 2.0, (2, 9), (3, 18, 2)),
    _c("res110_res32", "resnet110", "resnet32", "res110", "res32", 0.05, 2.0, 5.0, 4.0, (2, 9), (2, 15, 2)),
    _c("res32x4_res8x4", "resnet32x4", "resnet8x4", "res32x4", "res8x4", 0.05, 8.0, 4.0, 5.0, (2, 9), (2, 9, 8)),
    _c("wrn40_2_wrn_16_2", "wrn_40_2", "wrn_16_2", "wrn_40_2", "wrn_16_2", 0.05, 6.0, 4.0, 5.0, (2, 9), (2, 12, 2)),
    _c("wrn40_2_wrn_40_1", "wrn_40_2", "wrn_40_1", "wrn_40_2", "wrn_40_1", 0.05, 6.0, 3.0, 6.0, (2, 9), (2, 12, 2)),
    _c("vgg13_vgg8", "vgg13", "vgg8", "vgg13", "vgg8", 0.05, 6.0, 2.0, 7.0, (3, 9), (2, 15, 2)),
    _c("vgg13_mv2", "vgg13", "MobileNetV2", "vgg13", "mv2", 0.01, 6.0, 3.0, 6.0, (3, 9), (3, 9, 2)),
    _c("res50_mv2", "ResNet50", "MobileNetV2", "res50", "mv2", 0.01, 8.0, 2.0, 7.0, (3, 1), (2, 15, 2)),
    _c("res32x4_shuv1", "resnet32x4", "ShuffleV1", "res32x4", "shuv1", 0.01, 8.0, 0.5, 8.5, (2, 9), (2, 9, 8)),
    _c("res32x4_shuv2", "resnet32x4", "ShuffleV2", "res32x4", "shuv2", 0.01, 8.0, 4.0, 5.0, (2, 9), (2, 9, 8)),
    _c("wrn40_2_shuv1", "wrn_40_2", "ShuffleV1", "wrn_40_2", "shuv1", 0.01, 8.0, 4.0, 5.0, (2, 9), (2, 9, 8)),
    Pair("imagenet", "r34_r18", "ResNet34", "ResNet18", "res34", "res18", 0.2, 0.5, 1.0, 1.0, (2, 9), (2, 9, 0.5)),
    Pair(
        "imagenet", "r50_mv1", "ResNet50", "MobileNetV1", "res50", "mobilenetv1", 0.2, 2.0, 1.0, 1.0, (2, 9), (2, 9, 2)
    ),
)


def methods(dataset: str) -> tuple[str, ...]:
    """The methods with a packaged config for every pair of ``dataset``, in :data:`COMPARISON` order."""
    return COMPARISON if dataset == "cifar100" else METHODS


def find_pair(dataset: str, teacher: str, student: str) -> Pair | None:
    """The pair whose model keys or tags match (teacher, student) on dataset, if any."""
    for pair in PAIRS:
        if pair.dataset != dataset:
            continue
        if (teacher, student) in ((pair.teacher, pair.student), (pair.teacher_tag, pair.student_tag)):
            return pair
    return None
