"""``SOLVER.TRAINER fast``: the host's base trainer, with the data and the step kept on the GPU.

Same semantics as ``mdistiller.engine.trainer.BaseTrainer`` (it is a subclass: optimizer, step
learning-rate schedule, ``log()``, ``worklog.txt``, checkpoints, ``--resume``); what changes:

* the CIFAR split lives on the device as uint8; each epoch is shuffled, cropped, flipped and
  normalised there in a few batched kernels (the host's pipeline, read from its transform);
* on CUDA the whole step (forward of student and teacher, loss, backward, SGD step, metric
  sums) is captured once per epoch as a CUDA graph and replayed. Per-epoch capture makes the
  learning rate and the distiller's ``epoch`` (DKD-style warm-up) exact constants of the graph;
  the first batch of each epoch runs eagerly as the capture's warm-up;
* the last partial batch (50,000 % 64 = 16 images) runs eagerly after the replays, so every
  image is used once per epoch as with the host's DataLoader and shapes stay static;
* optional bfloat16 autocast (``SOLVER.AMP``) and channels_last (``SOLVER.FAST.CHANNELS_LAST``);
* validation runs on the device in batches of ``SOLVER.FAST.EVAL_BATCH_SIZE``.

If capture fails the trainer logs why and continues eagerly; on CPU it is always eager.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from mdistiller.engine.trainer import BaseTrainer
from mdistiller.engine.utils import adjust_learning_rate, save_checkpoint
from torch import Tensor
from yacs.config import CfgNode as CN

from .augment import TensorCifar, host_pipeline

log = logging.getLogger(__name__)

__all__ = ["FastTrainer"]


def _topk_correct(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    top5 = logits.topk(5, dim=1).indices
    hit = top5.eq(target.unsqueeze(1))
    return hit[:, 0].sum(), hit.any(dim=1).sum()


class FastTrainer(BaseTrainer):
    """mdistiller's BaseTrainer with device-resident data and a CUDA-graph training step."""

    @classmethod
    def cfg_defaults(cls) -> CN:
        """SOLVER.AMP and SOLVER.FAST.{CUDA_GRAPH, CHANNELS_LAST, EVAL_BATCH_SIZE}."""
        cfg = CN()
        cfg.SOLVER = CN()
        cfg.SOLVER.AMP = False  # bfloat16 autocast for forward passes
        cfg.SOLVER.FAST = CN()
        cfg.SOLVER.FAST.CUDA_GRAPH = True
        cfg.SOLVER.FAST.CHANNELS_LAST = False
        cfg.SOLVER.FAST.EVAL_BATCH_SIZE = 1000
        cfg.SOLVER.FAST.ITERS_PER_EPOCH = 0  # > 0: a short epoch of that many steps (smoke runs only)
        return cfg

    def __init__(self, experiment_name, distiller, train_loader, val_loader, cfg):
        super().__init__(experiment_name, distiller, train_loader, val_loader, cfg)
        self.model = distiller.module if isinstance(distiller, torch.nn.DataParallel) else distiller
        self.device = next(self.model.parameters()).device
        self.train_data = self._tensor_split(train_loader, "train")
        self.val_data = self._tensor_split(val_loader, "validation")
        fast = cfg.SOLVER.FAST
        self.channels_last = bool(fast.CHANNELS_LAST)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.use_graph = bool(fast.CUDA_GRAPH) and self.device.type == "cuda"
        self.amp = bool(cfg.SOLVER.AMP)
        self.batch_size = int(cfg.SOLVER.BATCH_SIZE)
        self._graph = None
        self._graph_epoch = None
        self._sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss*n, top1, top5, n

    def _tensor_split(self, loader, what: str) -> TensorCifar:
        ds = loader.dataset
        if not hasattr(ds, "data") or not hasattr(ds, "targets"):
            raise TypeError(
                f"SOLVER.TRAINER fast needs an in-memory CIFAR-style {what} dataset with .data and "
                f".targets (got {type(ds).__name__}); use SOLVER.TRAINER base for folder datasets"
            )
        return TensorCifar(ds.data, ds.targets, host_pipeline(ds.transform), self.device)

    def _autocast(self):
        # The autocast weight cache must stay off: graph replays re-read the fp32 weights.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, image: Tensor, target: Tensor, epoch: int) -> None:
        """One host train_iter without host syncs: forward, sum of losses, backward, step, metric sums."""
        with self._autocast():
            preds, losses = self.model(image=image, target=target, epoch=epoch)
        loss = sum(value.mean() for value in losses.values())
        loss.backward()
        self.optimizer.step()
        top1, top5 = _topk_correct(preds.detach(), target)
        n = target.shape[0]
        count = torch.full_like(top1, n)  # a fill kernel: capturable, unlike a host-to-device copy
        self._sums += torch.stack([loss.detach() * n, top1, top5, count]).double()

    def _eager_step(self, image: Tensor, target: Tensor, epoch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._step(self._layout(image), target, epoch)

    def _capture(self, image: Tensor, target: Tensor, epoch: int) -> None:
        """Warm up on (image, target) eagerly on a side stream, then capture one step."""
        self._graph = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._eager_step(image, target, epoch)
        torch.cuda.current_stream().wait_stream(stream)
        self._static_x = self._layout(image.clone())
        self._static_y = target.clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(self._static_x, self._static_y, epoch)
        self._graph, self._graph_epoch = graph, epoch

    def train_iterations(self, epoch: int, count: int | None = None) -> int:
        """Train on ``count`` images (default: the whole split) of a fresh epoch; returns steps run."""
        self.model.train()
        images, targets = self.train_data.epoch(count)
        n, bs = targets.shape[0], self.batch_size
        full = n // bs
        start = 0
        if self.use_graph and full > 1:
            if self._graph_epoch != epoch:
                try:
                    self._capture(images[:bs], targets[:bs], epoch)
                    start = 1
                except RuntimeError as exc:
                    log.warning("CUDA graph capture failed (%s); training eagerly", exc)
                    self.use_graph, self._graph = False, None
                    torch.cuda.synchronize()
            if self._graph is not None:
                for i in range(start, full):
                    self._static_x.copy_(images[i * bs : (i + 1) * bs])
                    self._static_y.copy_(targets[i * bs : (i + 1) * bs])
                    self._graph.replay()
                start = full
        for i in range(start, full):
            self._eager_step(images[i * bs : (i + 1) * bs], targets[i * bs : (i + 1) * bs], epoch)
        if n % bs:
            self._eager_step(images[full * bs :], targets[full * bs :], epoch)
        return full + (1 if n % bs else 0)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, float]:
        """(top-1 %, top-5 %, mean CE) of the student on the validation split."""
        self.model.eval()
        images, targets = self.val_data.eval_set()
        step = int(self.cfg.SOLVER.FAST.EVAL_BATCH_SIZE)
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        for i in range(0, targets.shape[0], step):
            x, y = self._layout(images[i : i + step]), targets[i : i + step]
            with self._autocast():
                logits = self.model(image=x)
            top1, top5 = _topk_correct(logits, y)
            ce = F.cross_entropy(logits.float(), y, reduction="sum")
            sums += torch.stack([top1.double(), top5.double(), ce.double()])
        n = targets.shape[0]
        top1, top5, ce = sums.tolist()
        return 100.0 * top1 / n, 100.0 * top5 / n, ce / n

    def train_epoch(self, epoch: int) -> None:
        """The host's train_epoch: schedule, one pass over the data, validation, log, checkpoints."""
        # The host returns a numpy float once the LR has decayed; a numpy scalar in the optimizer
        # state makes torch>=2.6's weights_only torch.load (the host's resume) refuse the file.
        lr = float(adjust_learning_rate(epoch, self.cfg, self.optimizer))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._sums.zero_()
        t0 = time.perf_counter()
        iters = int(self.cfg.SOLVER.FAST.ITERS_PER_EPOCH)
        steps = self.train_iterations(epoch, iters * self.batch_size if iters > 0 else None)
        loss_sum, top1, _, n = self._sums.tolist()
        train_s = time.perf_counter() - t0
        test_acc, test_acc_top5, test_loss = self.evaluate()
        log.info(
            "epoch %d: %.2f ms/iter, train loss %.4f, test acc %.2f",
            epoch, 1e3 * train_s / steps, loss_sum / n, test_acc,
        )  # fmt: skip
        log_dict = OrderedDict(
            train_acc=100.0 * top1 / n,
            train_loss=loss_sum / n,
            test_acc=test_acc,
            test_acc_top5=test_acc_top5,
            test_loss=test_loss,
        )
        self.log(lr, epoch, log_dict)
        self._save(epoch, test_acc)

    def _save(self, epoch: int, test_acc: float) -> None:
        """The host's checkpoint files: latest, student_latest, epoch_N every SAVE_CHECKPOINT_FREQ, best."""
        state = {
            "epoch": epoch,
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
        }
        student_state = {"model": self.model.student.state_dict()}
        path = self.log_path
        save_checkpoint(state, os.path.join(path, "latest"))
        save_checkpoint(student_state, os.path.join(path, "student_latest"))
        if epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            save_checkpoint(state, os.path.join(path, f"epoch_{epoch}"))
            save_checkpoint(student_state, os.path.join(path, f"student_{epoch}"))
        if test_acc >= self.best_acc:
            save_checkpoint(state, os.path.join(path, "best"))
            save_checkpoint(student_state, os.path.join(path, "student_best"))
