"""Per-sample temperatures in tensorboard: each epoch's mean and spread of the teacher's and the student's T_n.

NormKD and NormDKD soften z_n with T_n = T_norm * std(z_n), KD+LS and DKD+LS with tau * (1e-7 + std(z_n)) (the
divisor inside softmax(z-score / tau)). The distillers sum them on the device during the epoch; the ``fast``
trainer writes ``temperature/{teacher,student}_{mean,std}`` (std over the epoch's samples) with the epoch's
other scalars. The references here are float64 over the logits every training step really saw.
"""

from __future__ import annotations

import struct

import pytest
import torch

from conftest import fast_opts, needs_cuda, needs_mdistiller, spawn_and_wait

pytestmark = needs_mdistiller

KEYS = ("temperature/teacher_mean", "temperature/teacher_std", "temperature/student_mean", "temperature/student_std")


def reference(teacher_logits: list[torch.Tensor], student_logits: list[torch.Tensor], kind: str, t: float) -> dict:
    """Mean and population std over all rows of the batches of each model's per-sample temperature, float64."""

    def temps(batches):
        z = torch.cat([b.double() for b in batches])
        std = z.std(dim=1, unbiased=True)
        return t * std if kind in ("NORMKD", "NORMDKD") else t * (1e-7 + std)

    out = {}
    for who, batches in (("teacher", teacher_logits), ("student", student_logits)):
        values = temps(batches)
        out[f"temperature/{who}_mean"] = values.mean().item()
        out[f"temperature/{who}_std"] = values.std(unbiased=False).item()
    return out


BASE_KEY = {"NORMKD": "TEMPERATURE_NORM", "NORMDKD": "TEMPERATURE_NORM", "KD_LS": "TEMPERATURE", "DKD_LS": "T"}


def base_temperature(cfg) -> float:
    """T_norm (NormKD, NormDKD) or tau (KD+LS, DKD+LS) of the config's distiller."""
    return cfg[cfg.DISTILLER.TYPE][BASE_KEY[cfg.DISTILLER.TYPE]]


def read_scalars(events_dir) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every scalar in the tensorboard event files of ``events_dir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(events_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


@pytest.mark.quick
def test_epoch_sums_give_the_mean_and_spread_of_the_added_batches():
    from normkd_plugin.distillers import EpochTemperatures

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(n, generator=g) * 4 + 1, torch.rand(n, 1, generator=g) * 3 + 2) for n in (16, 16, 7)]
    stats = EpochTemperatures()
    assert stats.scalars() == {}
    stats.add(torch.full((3,), 99.0), torch.full((3,), 99.0))  # a batch of the epoch before
    stats.reset("cpu")
    kept = stats.sums
    for teacher, student in batches:
        stats.add(teacher, student)
    assert stats.sums is kept  # reset zeroes in place: a captured CUDA graph keeps adding to the same tensor
    got = stats.scalars()
    t = torch.cat([b[0].double() for b in batches])
    s = torch.cat([b[1].double().reshape(-1) for b in batches])
    want = [t.mean(), t.std(unbiased=False), s.mean(), s.std(unbiased=False)]
    assert list(got) == list(KEYS)
    assert list(got.values()) == pytest.approx([w.item() for w in want], rel=1e-12)


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["normkd", "normdkd", "kd_ls", "dkd_ls"])
def test_forward_train_records_the_temperatures_it_softens_with(kind):
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.config import load_config

    cfg = load_config(f"cifar100/{kind}/res56_res20")
    d = distiller_dict[cfg.DISTILLER.TYPE](
        cifar_model_dict["resnet8"][0](num_classes=100), cifar_model_dict["resnet20"][0](num_classes=100), cfg
    ).train()
    t = base_temperature(cfg)
    seen_t, seen_s = [], []
    d.teacher.register_forward_hook(lambda m, i, out: seen_t.append(out[0].detach()))
    d.student.register_forward_hook(lambda m, i, out: seen_s.append(out[0].detach()))
    d.epoch_scalars.reset("cpu")
    for n in (6, 3):
        d(image=torch.randn(n, 3, 32, 32), target=torch.randint(0, 100, (n,)), epoch=30)
    want = reference(seen_t, seen_s, cfg.DISTILLER.TYPE, t)
    got = d.epoch_scalars.scalars()
    assert got == pytest.approx(want, rel=1e-5)
    assert got["temperature/teacher_mean"] != pytest.approx(got["temperature/student_mean"], rel=1e-3)


def test_the_fast_trainer_logs_each_epochs_temperatures_to_tensorboard(
    tmp_path, small_cifar_npz, teacher_resnet56, monkeypatch
):
    """A pack of NormKD, NormDKD, KD+LS, DKD+LS and KD, 2 epochs on real data: each run's event file holds, per
    epoch, the float64 mean and spread over that epoch's training batches (not the validation's, nor the epoch
    before's); KD logs none."""
    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    methods = ("normkd", "normdkd", "kd_ls", "dkd_ls", "kd")
    cfgs, names = [], []
    for seed, method in enumerate(methods):
        opts = fast_opts(small_cifar_npz, teacher_resnet56, tmp_path, seed % 2)
        cfgs.append(load_config(f"cifar100/{method}/res56_res20", opts))
        names.append(run_name(cfgs[-1], opts))
    seen: dict[tuple[str, int], list] = {}  # (run name, epoch) -> [(teacher logits, student logits) per step]
    _watch_steps(seen, monkeypatch)
    train_pack(cfgs, names, torch.device("cpu"))
    for cfg, name in zip(cfgs, names):
        logged = read_scalars(tmp_path / name / "train.events")
        assert ("test_acc", 2) in logged
        kind = cfg.DISTILLER.TYPE
        if kind == "KD":
            assert not any(tag.startswith("temperature/") for tag, _ in logged)
            continue
        t = base_temperature(cfg)
        for epoch in (1, 2):
            steps = seen[(name, epoch)]
            assert len(steps) == 4 and sum(s.shape[0] for _, s in steps) == 56
            want = reference([tt for tt, _ in steps], [s for _, s in steps], kind, t)
            got = {key: logged[(key, epoch)] for key in KEYS}
            assert got == pytest.approx(want, rel=1e-6), (name, epoch)
        assert logged[(KEYS[2], 1)] != pytest.approx(logged[(KEYS[2], 2)], rel=1e-6)  # the student moved


def _watch_steps(seen: dict, monkeypatch) -> None:
    """Wrap ``PackStep.train_steps`` so that, per (run name, epoch), each step's (teacher logits, student logits) are
    recorded: each run's ``forward_train`` is wrapped for the epoch."""
    from normkd_plugin.engine.step import PackStep

    original = PackStep.train_steps

    def watched(self, runs, epoch, *args, **kwargs):
        for run in runs:
            forward = run.distiller.forward_train

            def record(_f=forward, _r=run, **kw):
                preds, losses = _f(**kw)
                with torch.no_grad():
                    teacher = _r.distiller.teacher(kw["image"])[0]  # the step's precomputed output
                seen.setdefault((_r.name, kw["epoch"]), []).append((teacher.detach(), preds.detach()))
                return preds, losses

            run.distiller.forward_train = record
        try:
            return original(self, runs, epoch, *args, **kwargs)
        finally:
            for run in runs:
                del run.distiller.forward_train

    monkeypatch.setattr(PackStep, "train_steps", watched)


def _rank(rank, world, root, teacher, prefix, out):
    """One torchrun-like process (gloo) training a KD+LS run for an epoch; saves the logits each step saw here."""
    import torch.distributed as dist

    from normkd_plugin.config import load_config, run_name
    from normkd_plugin.train import train_pack

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    seen = {}
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            _watch_steps(seen, monkeypatch)
            opts = fast_opts(root, teacher, prefix, 0, "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]")
            cfg = load_config("cifar100/dkd_ls/res56_res20", opts)
            name = run_name(cfg, opts)
            train_pack([cfg], [name], torch.device("cpu"))  # inside the caller's process group: its ranks
        torch.save({"steps": seen[(name, 1)], "name": name}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_on_two_ranks_the_logged_temperatures_cover_both_ranks_rows(tmp_path, small_cifar_npz, teacher_resnet56):
    """Each rank sums its share of every global batch; the epoch's scalars are over the whole batches (the sums
    added over the ranks), not rank 0's half."""
    out = tmp_path / "out"
    out.mkdir()
    spawn_and_wait(_rank, (2, small_cifar_npz, teacher_resnet56, tmp_path / "runs", out), 2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    steps = [step for r in ranks for step in r["steps"]]
    assert sum(s.shape[0] for _, s in steps) == 56 and all(len(r["steps"]) == 4 for r in ranks)
    logged = read_scalars(tmp_path / "runs" / ranks[0]["name"] / "train.events")
    want = reference([t for t, _ in steps], [s for _, s in steps], "DKD_LS", 3.0)
    assert {key: logged[(key, 1)] for key in KEYS} == pytest.approx(want, rel=1e-6)
    half = reference([t for t, _ in ranks[0]["steps"]], [s for _, s in ranks[0]["steps"]], "DKD_LS", 3.0)
    assert logged[(KEYS[3], 1)] != pytest.approx(half[KEYS[3]], rel=1e-6)


@needs_cuda
def test_recording_the_temperatures_needs_no_host_sync_on_cuda():
    from normkd_plugin.distillers import EpochTemperatures
    from normkd_plugin.losses import ls_temperature, per_sample_temperature

    z = torch.randn(64, 100, device="cuda")
    stats = EpochTemperatures()
    stats.reset(torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.add(per_sample_temperature(z, 2.0), ls_temperature(z, 2.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.scalars()["temperature/teacher_mean"] == pytest.approx(2.0 * z.double().std(1).mean().item(), 1e-5)
