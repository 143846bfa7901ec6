"""Whose a training state is: its run, seed, config and what it learned from, and the checks a resume makes.

Every state a run folder writes carries an ``identity``: the run's name under LOG.PREFIX, its data
seed, its config (and a digest of the keys that change what is trained) and, when known, its teacher
file's SHA-256 and its data's identity (:mod:`normkd_plugin.provenance`). ``--resume`` refuses a
state of another run, of another config, or trained with another teacher or on other data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import yaml

from .errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "trained_config",
    "config_digest",
    "config_changes",
    "identity",
    "config_seed",
    "check_owner",
    "check_learned_from",
    "saved_config_problem",
]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def trained_config(cfg_text: str | None) -> dict:
    """The flattened config without the keys that do not change what is trained (UNTRAINED_KEYS)."""
    from .config import UNTRAINED_KEYS, flatten

    tree = yaml.load(cfg_text or "", Loader=_LOADER)
    return {
        k: v for k, v in flatten(tree if isinstance(tree, dict) else {}).items() if not k.startswith(UNTRAINED_KEYS)
    }


def config_digest(cfg_text: str) -> str:
    """A short digest of what ``cfg_text`` trains (the keys of ``trained_config``)."""
    blob = json.dumps(sorted(trained_config(cfg_text).items()), default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_changes(before: dict, after: dict) -> str:
    """'KEY old -> new, ...' of the trained keys that differ (keys one side lacks are not compared), or ''."""
    changed = [k for k in sorted(before) if k in after and before[k] != after[k]]
    diffs = ", ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in changed[:3])
    return diffs + (", ..." if len(changed) > 3 else "")


def identity(name: str, seed: int, config: str, learned_from: dict | None) -> dict:
    """{"run", "seed", "config", "digest"[, "learned_from"]}: whose a state is."""
    out = {"run": name, "seed": int(seed), "config": config, "digest": config_digest(config)}
    if learned_from is not None:
        out["learned_from"] = learned_from
    return out


def config_seed(config: str | None) -> int | None:
    """EXPERIMENT.SEED of the config dump ``config`` (None when there is none or it is not an integer)."""
    from .config import flatten

    if config is None:
        return None
    seed = flatten(yaml.load(config, Loader=_LOADER)).get("EXPERIMENT.SEED")
    return int(seed) if isinstance(seed, int) else None


def check_owner(theirs: dict, source: os.PathLike | str, name: str, config: str | None) -> None:
    """RunError unless the identity ``theirs`` is of run ``name`` (and its seed, when fixed) under ``config``."""
    seed = config_seed(config)
    if theirs.get("run") != name or (seed is not None and seed >= 0 and int(theirs.get("seed", -1)) != seed):
        mine = f"seed {seed}" if seed is not None and seed >= 0 else "any seed"
        raise RunError(
            f"--resume: {source} is a state of run {theirs.get('run')!r} (seed {theirs.get('seed')}), not of this "
            f"folder's run {name!r} ({mine}); put back this run's own checkpoint, or resume that run "
            "in its own folder"
        )
    if config is not None and theirs.get("digest") != config_digest(config):
        diffs = config_changes(trained_config(theirs.get("config")), trained_config(config))
        if diffs:  # (digests of configs that differ only in keys one side lacks: a later version's keys)
            raise RunError(
                f"--resume: {source} was trained with another config than this command's ({diffs}); "
                "resume with the same config, or start a new run with another EXPERIMENT.NAME"
            )


def check_learned_from(recorded: dict | None, mine: dict | None, source: os.PathLike | str) -> None:
    """RunError unless this run's teacher and data (``mine``) are the ``recorded`` ones by content, naming both;
    nothing recorded (a folder from before the records) resumes with a warning and is recorded."""
    from .provenance import differences

    if mine is None:
        return
    if not recorded:
        log.warning(
            "%s: no record of the teacher and data it learned from (written before they were recorded); "
            "resuming unchecked, recorded from now on",
            source,
        )
        return
    diffs = differences(recorded, mine)
    if diffs:
        teacher, data = (any(d.startswith(k) for d in diffs) for k in ("teacher", "data"))
        what = " and ".join(["with another teacher"] * teacher + ["on other data"] * data)
        raise RunError(
            f"--resume: {source} was trained {what} than this command's ({'; '.join(diffs)}); resume with the "
            "files it started with (moved or copied is fine), or start a new run with another EXPERIMENT.NAME"
        )


def saved_config_problem(saved_text: str | None, cfg_text: str, folder: os.PathLike | str) -> str | None:
    """'missing', 'empty' or 'damaged' for a config.yaml (``saved_text``) that cannot be compared, else None after
    checking it: RunError unless ``cfg_text`` trains what it trained (keys of UNTRAINED_KEYS may change, and keys
    the saved file does not have, added by a later version, are not compared)."""
    try:
        saved = yaml.load(saved_text or "", Loader=_LOADER)
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict) or not saved:
        return "missing" if saved_text is None else "empty" if not saved_text.strip() else "damaged"
    diffs = config_changes(trained_config(saved_text), trained_config(cfg_text))
    if diffs:
        raise RunError(
            f"--resume: {folder} was started with another config ({diffs}); "
            "resume with the same config, or start a new run with another EXPERIMENT.NAME"
        )
    return None
