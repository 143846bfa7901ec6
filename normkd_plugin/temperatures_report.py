"""What normkd-temperatures prints and draws: the report of σ_n, T_n and the KL weights, and the histograms."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .pairs import Pair
from .temperatures import PERCENTILES, Settings, Summary, summarize

__all__ = ["Model", "report", "figure"]


@dataclass
class Model:
    """What one model's logits gave: its σ and T_n summaries, its top-1, the mean σ of each class."""

    name: str  # "teacher" or "student"
    arch: str
    checkpoint: str
    top1: float
    sigma: Summary
    temperature: Summary
    class_sigma: list[float | None]


def _row(label: str, s: Summary) -> str:
    return f"  {label:<14}" + "".join(f"{v:>8.2f}" for v in s.cells())


def _extremes(m: Model, k: int = 5) -> str:
    known = sorted((v, c) for c, v in enumerate(m.class_sigma) if v is not None)
    low = ", ".join(f"{c} {v:.2f}" for v, c in known[:k])
    high = ", ".join(f"{c} {v:.2f}" for v, c in reversed(known[-k:]))
    return f"  {m.name}: lowest {low}; highest {high}"


def report(pair: Pair, split: str, models: list[Model], s: Settings, normkd_w: Summary, kd_w: float, ls_w: float,
           per_class: bool) -> str:  # fmt: skip
    """The printed report: σ and T_n per model, the KL weights of the three methods, σ by class."""
    head = "".join(f"{h:>8}" for h in ("mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max"))
    lines = [f"{pair.dataset}/{pair.stem}, {split} split ({models[0].sigma.n} images, no augmentation)"]
    lines += [f"  {m.name} {m.arch} ({m.checkpoint}): top-1 {m.top1:.2f} %" for m in models]
    lines += [
        "",
        f"σ_n: unbiased std of image n's {len(models[0].class_sigma)} logits; T_n = T_norm·σ_n, T_norm {s.t_norm:g}",
        f"  {'':<14}{head}",
    ]
    for m in models:
        lines += [_row(f"{m.name} σ", m.sigma), _row(f"{m.name} T_n", m.temperature)]
    lines += [
        "",
        "KL weight of a sample (loss weight × temperature², the factor its KL enters the loss with):",
        f"  {'':<14}{head}",
        _row("NormKD", normkd_w) + f"   {s.normkd_weight:g}·T_n² ({s.normkd_source})",
        f"  {'KD':<14}{kd_w:>8.2f}   {s.kd_weight:g}·{s.kd_temperature:g}² ({s.kd_source})",
        f"  {'KD+LS':<14}{ls_w:>8.2f}   λ·τ² = {s.ls_weight:g}·{s.ls_tau:g}² ({s.ls_source})",
        f"  NormKD / KD+LS: mean {normkd_w.mean / ls_w:.2f}, p10 {normkd_w.percentiles[10] / ls_w:.2f}, "
        f"p90 {normkd_w.percentiles[90] / ls_w:.2f}"
        + (
            " (τ = T_norm: both soften the logits alike, the weight is their one difference)"
            if s.ls_tau == s.t_norm
            else f" (τ {s.ls_tau:g} ≠ T_norm {s.t_norm:g}: their softened logits differ too)"
        ),
        "",
        "mean σ by class (class id, mean σ of its images):",
    ]
    for m in models:
        if per_class:
            lines.append(
                f"  {m.name}: " + ", ".join(f"{c} {v:.2f}" for c, v in enumerate(m.class_sigma) if v is not None)
            )
        else:
            lines.append(_extremes(m))
    return "\n".join(lines) + "\n"


def figure(pair: Pair, split: str, sigmas: dict[str, Tensor], normkd_w: Tensor, kd_w: float, ls_w: float, s: Settings):
    """Two histograms: σ of each model (T_n = T_norm·σ on the top axis), and NormKD's per-sample KL weight against
    KD's and KD+LS's constants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, sigma), color in zip(sigmas.items(), ("tab:blue", "tab:orange")):
        q = summarize(sigma)
        p10, p90 = q.percentiles[10], q.percentiles[90]
        label = f"{name}: mean {q.mean:.2f}, p10 {p10:.2f}, p90 {p90:.2f}"
        left.hist(sigma.numpy(), bins=60, alpha=0.6, color=color, label=label)
        for x in (p10, p90):
            left.axvline(x, color=color, linestyle=":", linewidth=1)
        left.axvline(q.mean, color=color, linewidth=1.2)
    left.set_xlabel(r"$\sigma_n$: std of an image's logits (line: mean; dotted: p10, p90)")
    left.set_ylabel("images")
    top = left.secondary_xaxis("top", functions=(lambda x: s.t_norm * x, lambda t: t / s.t_norm))
    top.set_xlabel(rf"$T_n = {s.t_norm:g}\,\sigma_n$")
    left.set_ylim(top=left.get_ylim()[1] * 1.25)  # room for the legend above the bars
    left.legend(fontsize=8, loc="upper right")
    q = summarize(normkd_w)
    right.hist(normkd_w.numpy(), bins=60, color="tab:blue", alpha=0.6, label=rf"NormKD ${s.normkd_weight:g}\,T_n^2$")
    right.axvline(q.mean, color="tab:blue", linewidth=1.2, label=f"NormKD mean {q.mean:.1f}")
    right.axvline(kd_w, color="black", linestyle="--", label=f"KD {s.kd_weight:g}·{s.kd_temperature:g}² = {kd_w:.1f}")
    right.axvline(ls_w, color="tab:red", linestyle="--", label=f"KD+LS {s.ls_weight:g}·{s.ls_tau:g}² = {ls_w:.1f}")
    right.set_xlabel("KL weight of a sample (loss weight × temperature²)")
    right.set_ylim(top=right.get_ylim()[1] * 1.25)
    right.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"{pair.dataset} {pair.teacher} → {pair.student}: {', '.join(sigmas)} on the {split} split ({len(normkd_w)} images)"
    )
    fig.tight_layout()
    return fig
