"""What a run learns from: the SHA-256 of its teacher file and the identity of its data.

A run records it at its start, in every state it saves (``identity["learned_from"]``) and in
``provenance.yaml`` beside ``config.yaml`` (which stays the host's config, loadable with ``--cfg``);
``--resume`` refuses another teacher or other data (:func:`~normkd_plugin.run_identity.check_learned_from`).
Only content counts: a teacher or a data folder moved or copied elsewhere is the same one.

* teacher: ``{"path", "sha256"}`` of the checkpoint file the run loads: DISTILLER.TEACHER_CKPT, else
  mdistiller's path for the teacher (an ImageNet teacher without one: torchvision's cached download);
* data, CIFAR-100: ``{"root", "files": {name: sha256}}`` of the files the loader reads (the npz shards, or
  the cifar-100-python pickles, under DATASET.ROOT or in mdistiller's data folder);
* data, image folders (ImageFolder datasets): ``{"root", "classes", "images": {"train", "val"}}``, the
  training split's class list and each split's image count (hashing a million images would take minutes).

A file is hashed once per process for each (real path, device, inode, size, mtime, ctime), so a pack
of 15 runs hashes its teacher and its data once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "teacher_file", "teacher_identity", "data_identity", "learned_from", "differences"]

_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the file's bytes, read once per process while the file is unchanged."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def teacher_file(cfg) -> str | None:
    """The checkpoint file a run of ``cfg`` loads its teacher from (as ``build.build_teacher`` does); None without
    a teacher or a file (an ImageNet teacher that mdistiller builds pretrained from no URL)."""
    from .checkpoints import teacher_checkpoint_path

    if cfg.DISTILLER.TYPE == "NONE":
        return None
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if cfg.DATASET.TYPE == "imagenet":  # torch.utils.model_zoo.load_url's file in torch's hub cache
        import torch
        from mdistiller.models import imagenet_model_dict
        from mdistiller.models.imagenet.resnet import model_urls

        url = model_urls.get(getattr(imagenet_model_dict[cfg.DISTILLER.TEACHER], "__name__", ""))
        return None if url is None else os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    from mdistiller.models import cifar_model_dict

    return teacher_checkpoint_path(cfg, cifar_model_dict[cfg.DISTILLER.TEACHER][1])


def teacher_identity(cfg) -> dict | None:
    """``{"path": absolute path, "sha256": hex}`` of the teacher file of ``cfg``; None without a teacher."""
    path = teacher_file(cfg)
    if path is None:
        return None if cfg.DISTILLER.TYPE == "NONE" else {"path": f"pretrained {cfg.DISTILLER.TEACHER}", "sha256": None}
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def cifar_files(cfg) -> tuple[Path, list[Path]]:
    """(root, files) the CIFAR-100 loaders of ``cfg`` read: per split DATASET.ROOT's npz shards, else its
    cifar-100-python pickle (``data.load_cifar100``'s choice); without DATASET.ROOT, mdistiller's download."""
    from .data import _npz_split, host_data_folder

    if not cfg.DATASET.ROOT:
        root = Path(host_data_folder())
        return root, [root / "cifar-100-python" / split for split in ("train", "test")]
    root = Path(cfg.DATASET.ROOT).expanduser()
    files: list[Path] = []
    for split in ("train", "test"):
        shards = _npz_split(root, split)
        files += shards or [f / split for f in (root / "cifar-100-python", root) if (f / split).is_file()][:1]
    return root, files


def data_identity(cfg, train_set=None, val_set=None) -> dict | None:
    """The identity of the data a run of ``cfg`` trains and validates on (the module's docstring); None when
    neither files nor class folders describe it."""
    if cfg.DATASET.TYPE == "cifar100":
        root, files = cifar_files(cfg)
        return {
            "root": os.path.abspath(root),
            # by file name (a split's pickle or shard), not by path: both pickle layouts the loader reads
            # (ROOT/cifar-100-python/train and ROOT/train) hold the same data
            "files": {f.name: file_sha256(f) for f in files},
        }
    if all(hasattr(ds, "classes") and hasattr(ds, "root") for ds in (train_set, val_set)):
        return {
            "root": os.path.abspath(os.path.dirname(os.path.normpath(train_set.root))),
            "classes": [str(c) for c in train_set.classes],
            "images": {"train": len(train_set), "val": len(val_set)},
        }
    return None


def learned_from(cfg, train_set=None, val_set=None) -> dict:
    """``{"teacher": teacher_identity, "data": data_identity}`` of a run of ``cfg`` on these datasets."""
    return {"teacher": teacher_identity(cfg), "data": data_identity(cfg, train_set, val_set)}


def _short(digest: str | None) -> str:
    return "sha256 ?" if not digest else f"sha256 {digest[:12]}"


def _teacher_change(old: dict | None, new: dict | None) -> str | None:
    if old is None or new is None or (not old.get("sha256") and not new.get("sha256")):
        return None  # no teacher on a side (the config check covers DISTILLER.TYPE), or nothing to compare
    if old.get("sha256") == new.get("sha256"):
        return None
    return f"teacher {old.get('path')} ({_short(old.get('sha256'))}) -> {new.get('path')} ({_short(new.get('sha256'))})"


def _data_change(old: dict | None, new: dict | None) -> str | None:
    if not old or not new:
        return None
    where = old.get("root") if old.get("root") == new.get("root") else f"{old.get('root')} -> {new.get('root')}"
    if "files" in old and "files" in new:
        a, b = old["files"], new["files"]
        changed = [
            f"{name} {_short(a.get(name)) if name in a else 'absent'} -> {_short(b.get(name)) if name in b else 'absent'}"
            for name in sorted(set(a) | set(b))
            if a.get(name) != b.get(name)
        ]
        return f"data in {where}: {', '.join(changed)}" if changed else None
    if "classes" in old and "classes" in new:
        changed = []
        missing = [c for c in old["classes"] if c not in new["classes"]]
        extra = [c for c in new["classes"] if c not in old["classes"]]
        if missing or extra or old["classes"] != new["classes"]:
            changed.append(f"classes missing {missing[:5] or 'none'}, extra {extra[:5] or 'none'}")
        for split in sorted(set(old.get("images", {})) | set(new.get("images", {}))):
            before, after = old.get("images", {}).get(split), new.get("images", {}).get(split)
            if before != after:
                changed.append(f"{split} images {before} -> {after}")
        return f"data in {where}: {', '.join(changed)}" if changed else None
    return f"data in {where}: {sorted(old)} -> {sorted(new)}" if old != new else None


def differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two ``learned_from`` records, by content (paths alone never differ), each part
    naming the recorded and the current file or value; [] when they agree or a side recorded nothing."""
    changes = [
        _teacher_change(recorded.get("teacher"), current.get("teacher")),
        _data_change(recorded.get("data"), current.get("data")),
    ]
    return [c for c in changes if c]
