"""normkd-teachers: download mdistiller's released CIFAR-100 teachers, verify them, put them where it looks.

    normkd-teachers                      # download cifar_teachers.tar (release "checkpoints"), verify, install
    normkd-teachers --from FILE          # the same from a tar fetched by hand (no network)

The teachers go to ``<mdistiller checkout>/download_ckpts/cifar_teachers/<teacher>_vanilla/ckpt_epoch_240.pth``,
the path mdistiller's ``cifar_model_dict`` names and the one ``DISTILLER.TEACHER_CKPT ""`` (the default)
loads. Before anything is extracted every member's header is checked: a regular file (no link, device or
sparse file) named ``cifar_teachers/<teacher>_vanilla/<file>.pth``, declaring at most 4x its architecture's
weights + 1 MiB (2 GiB in all), and all of them fitting the free space. Before anything is installed every
checkpoint in the tar is checked:

* its SHA-256 against the published one where one is pinned (``PUBLISHED_SHA256``);
* its SHA-256 against the hashes recorded at the first download (``download_ckpts/cifar_teachers.sha256``):
  a later tar whose files differ is refused, so the teachers of one machine never silently change;
* it loads with ``torch.load(weights_only=True)`` (only tensors, numpy scalars and argparse.Namespace)
  and with strict keys and shapes into its mdistiller architecture.

The download shows a progress bar on a terminal, and is resumable: an interrupted download stays in
``download_ckpts/cifar_teachers.tar.part`` and the next run asks for the rest (an HTTP Range request).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError

__all__ = ["TeacherError", "StagingError", "URL", "PUBLISHED_SHA256", "default_dest", "fetch", "install", "main"]

URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
TAR = "cifar_teachers.tar"
RECORD = "cifar_teachers.sha256"  # sha256sum format, written at the first install
# SHA-256 of released members, as published (a public reproduction pins the resnet32x4 teacher).
PUBLISHED_SHA256 = {
    "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth": (
        "22aa12e2b632b19ddde155ccf2388671842ddd304824b3095e0a7fff364beb4f"
    ),
}
_MEMBER = re.compile(r"^cifar_teachers/(?P<arch>[A-Za-z0-9_]+)_vanilla/[A-Za-z0-9_.-]+\.pth$")
_CHUNK = 1 << 20
# A checkpoint holds its float32 weights and at most an optimizer state of the same size (the release: about 2x
# the weights, 364 MB in all); a member declaring more than this many times the weights' bytes, plus 1 MiB, is refused.
_SIZE_FACTOR = 4
_MAX_TOTAL = 2 << 30  # bytes all members may declare together
BY_HAND = (
    f"without network, fetch {URL} by hand (mdistiller's release 'checkpoints') and run normkd-teachers --from FILE"
)


class TeacherError(UserError, RuntimeError):
    """A teacher archive that cannot be fetched or verified; the message names the file or URL."""


class StagingError(TeacherError):
    """The destination cannot take the teachers (a full disk, no permission); the archive is not at fault."""


def default_dest() -> Path:
    """``<mdistiller checkout>/download_ckpts``: where mdistiller's cifar_model_dict looks for the teachers."""
    try:
        from mdistiller.models.cifar import cifar100_model_prefix
    except ImportError as exc:
        raise TeacherError(
            f"mdistiller is not importable ({exc}); install its checkout (pip install -e CHECKOUT), or give --dest DIR"
        ) from None
    return Path(os.path.normpath(os.path.join(cifar100_model_prefix, "..")))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


_RECORD_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64}) [ *](?P<name>\S+)$")  # sha256sum's format


def read_record(dest: Path) -> dict[str, str] | None:
    """The member -> SHA-256 map recorded at the first install, or None; TeacherError naming a damaged line."""
    path = dest / RECORD
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    damaged = "restore it, or delete it to record the hashes of the next install"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TeacherError(f"{path}: line {line}: not text (byte {data[exc.start]:#04x}); {damaged}") from None
    record: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):  # numbered as editors number them
        if not line.strip():
            continue
        match = _RECORD_LINE.match(line.strip())
        if not match or not _MEMBER.match(match.group("name")):
            raise TeacherError(
                f"{path}: line {number}: {line.strip()[:120]!r} is not '<sha256>  cifar_teachers/<teacher>_vanilla/"
                f"<file>.pth'; {damaged}"
            )
        if match.group("name") in record:
            raise TeacherError(f"{path}: line {number}: {match.group('name')} is recorded twice; {damaged}")
        record[match.group("name")] = match.group("digest")
    if not record:
        raise TeacherError(f"{path}: holds no hashes; {damaged}")
    return record


def installed(dest: Path) -> dict[str, str] | None:
    """The record when every recorded file is in place with its recorded hash, else None."""
    record = read_record(dest)
    if not record:
        return None
    for name, digest in record.items():
        path = dest / name
        if not path.is_file() or _sha256(path) != digest:
            return None
    return record


def _progress(total: int | None, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=None,  # off when stderr is not a terminal (logs): one line at the end instead
        file=sys.stderr,
    )


def fetch(url: str, part: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``part`` (resuming what it already holds), then rename it without ``.part``."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing past what we hold: the part may be a damaged whole; start again
            part.unlink()
            return fetch(url, part, timeout)
        raise TeacherError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; {BY_HAND}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TeacherError(f"cannot download {url}: {reason}; {BY_HAND}") from None
    with response:
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done = have
        try:
            part.parent.mkdir(parents=True, exist_ok=True)  # only once the server answered
            f = open(part, "ab" if resumed else "wb")
        except OSError as exc:
            raise TeacherError(f"cannot write {part}: {exc.strerror}; give a writable --dest DIR") from None
        bar = _progress(total, have, TAR)
        try:
            with f:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (OSError, ValueError) as exc:  # a dropped connection: keep the part, resume later
                        raise TeacherError(
                            f"download of {url} interrupted at {done:,} bytes ({exc}); run the same command "
                            f"again to resume it (kept in {part}), or {BY_HAND}"
                        ) from None
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and done != total:
        raise TeacherError(
            f"download of {url} ended at {done:,} of {total:,} bytes; run the same command again to resume it "
            f"(kept in {part})"
        )
    if resumed:
        print(f"normkd-teachers: resumed the download at {have:,} bytes", file=sys.stderr)
    whole = part.with_name(part.name[: -len(".part")])
    os.replace(part, whole)
    print(f"normkd-teachers: downloaded {whole} ({done / 1e6:.1f} MB)", file=sys.stderr)
    return whole


def _check_member(member: tarfile.TarInfo, tar_path: Path) -> str | None:
    """The architecture of a checkpoint member; None for a directory; TeacherError for anything else."""
    name = member.name
    if member.isdir():
        if name.startswith("/") or ".." in Path(name).parts:
            raise TeacherError(f"{tar_path}: unsafe member path {name!r}; refusing the archive")
        return None
    if member.issparse():  # a few KB in the tar that expand to any size when read
        raise TeacherError(
            f"{tar_path}: member {name!r} is a sparse file (declaring {member.size:,} bytes); refusing the archive"
        )
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise TeacherError(
            f"{tar_path}: member {name!r} is not a regular file (a link, device or other type); refusing the archive"
        )
    match = _MEMBER.match(name)
    if not match:
        raise TeacherError(
            f"{tar_path}: unexpected member {name!r}; expected cifar_teachers/<teacher>_vanilla/<file>.pth "
            "(is this mdistiller's cifar_teachers.tar?)"
        )
    return match.group("arch")


def _plan(tar_path: Path, members: list[tarfile.TarInfo], models: dict) -> list[tuple[tarfile.TarInfo, str]]:
    """Every checkpoint member with its architecture, checked before anything is extracted: type, path,
    architecture, no duplicate, and its declared size within _SIZE_FACTOR x its architecture's weights + 1 MiB."""
    from mdistiller.models import cifar_model_dict

    plan, seen = [], set()
    for member in members:
        arch = _check_member(member, tar_path)
        if arch is None:
            continue
        if arch not in cifar_model_dict:
            raise TeacherError(f"{tar_path}: member {member.name}: mdistiller has no CIFAR model {arch!r}")
        if member.name in seen:
            raise TeacherError(f"{tar_path}: member {member.name} appears twice; refusing the archive")
        seen.add(member.name)
        if arch not in models:
            models[arch] = cifar_model_dict[arch][0](num_classes=100)
        weights = sum(t.numel() * t.element_size() for t in models[arch].state_dict().values())
        limit = _SIZE_FACTOR * weights + (1 << 20)
        if member.size > limit:
            raise TeacherError(
                f"{tar_path}: member {member.name} declares {member.size:,} bytes, more than a {arch} checkpoint "
                f"holds (at most {limit:,}); refusing the archive"
            )
        plan.append((member, arch))
    total = sum(member.size for member, _ in plan)
    if total > _MAX_TOTAL:
        raise TeacherError(
            f"{tar_path}: its {len(plan)} checkpoints declare {total:,} bytes in all, more than the "
            f"{_MAX_TOTAL:,} allowed (the release holds about 364 MB); refusing the archive"
        )
    return plan


def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _stage(tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path, tar_path: Path) -> None:
    """Copy ``member``'s declared bytes to ``out``; TeacherError naming the tar and ``out`` on an error."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(out, "wb") as f:
            shutil.copyfileobj(src, f, _CHUNK)
    except (tarfile.TarError, EOFError) as exc:
        raise TeacherError(f"{tar_path}: member {member.name} is truncated ({exc}); download it again") from None
    except OSError as exc:
        where = exc.filename or out
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise StagingError(
            f"{where}: cannot write it, staging {member.name} of {tar_path}: {_cause(exc)}"
            + ("; free space there or give another --dest DIR" if full else "")
        ) from None


def verify_and_stage(tar_path: Path, staging: Path, record: dict[str, str] | None) -> dict[str, str]:
    """Extract every checkpoint of ``tar_path`` into ``staging`` and verify it; member -> SHA-256.

    Every member's type, path and declared size are checked before anything is extracted, and the
    declared total against the free space of ``staging``. TeacherError on the first member that is
    unsafe, unknown, too large, differs from the published or recorded hash, does not load with
    weights_only, or does not fit its architecture strictly.
    """
    from .checkpoints import CheckpointError, load_weights

    try:
        tar = tarfile.open(tar_path, "r:")  # the release is an uncompressed tar; no decompression bomb
    except (tarfile.TarError, OSError) as exc:
        raise TeacherError(
            f"{tar_path}: not a readable tar archive ({exc}); download it again (the release is an uncompressed tar)"
        ) from None
    seen: dict[str, str] = {}
    models: dict = {}
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise TeacherError(f"{tar_path}: truncated or corrupt tar archive ({exc}); download it again") from None
        plan = _plan(tar_path, members, models)
        need, free = sum(member.size for member, _ in plan), shutil.disk_usage(staging).free
        if need > free:
            raise StagingError(
                f"{staging}: staging the teachers needs {need / 1e6:.1f} MB, only {free / 1e6:.1f} MB are free there; "
                "free space or give another --dest DIR"
            )
        for member, arch in plan:
            out = staging / member.name
            _stage(tar, member, out, tar_path)
            digest = seen[member.name] = _sha256(out)
            published = PUBLISHED_SHA256.get(member.name)
            if published is not None and digest != published:
                raise TeacherError(
                    f"{tar_path}: {member.name} has SHA-256 {digest}, not the published {published}; refusing it"
                )
            if record is not None and record.get(member.name) != digest:
                first = record.get(member.name, "absent")
                raise TeacherError(
                    f"{tar_path}: {member.name} has SHA-256 {digest}, but the first download recorded {first} "
                    f"(in {RECORD}); refusing a teacher that changed"
                )
            try:
                load_weights(models[arch], out, f"mdistiller's {arch}")
            except CheckpointError as exc:
                raise TeacherError(f"{tar_path}: member {member.name}: {exc}") from None
            print(f"normkd-teachers: verified {member.name} (sha256 {digest[:12]}…)", file=sys.stderr)
    missing = sorted(set(PUBLISHED_SHA256) - set(seen))
    if missing:
        raise TeacherError(f"{tar_path}: lacks {', '.join(missing)}; it is not mdistiller's released {TAR}")
    if record is not None and set(record) != set(seen):
        gone = sorted(set(record) - set(seen))
        raise TeacherError(f"{tar_path}: lacks {', '.join(gone)}, recorded at the first download (in {RECORD})")
    if not seen:
        raise TeacherError(f"{tar_path}: holds no teacher checkpoint")
    return seen


def install(tar_path: Path, dest: Path) -> dict[str, str]:
    """Verify ``tar_path`` and move its checkpoints into ``dest``; record their hashes at the first install."""
    from .run_files import atomic_write

    record = read_record(dest)
    staging = dest / ".cifar_teachers.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise StagingError(f"cannot write {staging}: {_cause(exc)}; give a writable --dest DIR") from None
    try:
        seen = verify_and_stage(tar_path, staging, record)
        for name in seen:  # everything verified: only now does anything replace what was there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if record is None:
        text = "".join(f"{digest}  {name}\n" for name, digest in sorted(seen.items()))
        atomic_write(dest / RECORD, lambda f: f.write(text.encode()))
    return seen


def main(argv: list[str] | None = None) -> None:
    """Fetch (or take --from), verify and install the teachers; exit 2 with one line on any failure."""
    from ._cli import user_errors

    ap = argparse.ArgumentParser(
        prog="normkd-teachers",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--from", dest="source", metavar="FILE", help="a cifar_teachers.tar fetched by hand")
    ap.add_argument("--url", default=URL, help="where to download the tar from (default: mdistiller's release)")
    ap.add_argument(
        "--dest",
        metavar="DIR",
        help="the folder to hold cifar_teachers/ (default: the mdistiller checkout's "
        "download_ckpts, where mdistiller and DISTILLER.TEACHER_CKPT's default look)",
    )
    ap.add_argument("--keep-tar", action="store_true", help="keep the downloaded tar after installing")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    args = ap.parse_args(argv)
    with user_errors(ap.prog, args.debug):
        if args.source is not None and not Path(args.source).is_file():
            raise TeacherError(f"--from {args.source}: no such file")
        dest = Path(args.dest) if args.dest else default_dest()
        done = installed(dest) if args.source is None else None
        if done is not None:
            print(f"{len(done)} teachers already in {dest / 'cifar_teachers'}, verified against {dest / RECORD}")
            return
        if args.source is not None:
            tar_path = Path(args.source)
        else:
            tar_path = dest / TAR
            if not tar_path.is_file():
                tar_path = fetch(args.url, dest / f"{TAR}.part")
        try:
            seen = install(tar_path, dest)
        except TeacherError as exc:
            if args.source is None and not isinstance(exc, StagingError):
                tar_path.unlink(missing_ok=True)  # a bad download is not kept to be trusted next time
            raise
        if args.source is None and not args.keep_tar:
            tar_path.unlink()
        for name in sorted(seen):
            print(dest / name)
        print(f"{len(seen)} teachers in {dest / 'cifar_teachers'}; DISTILLER.TEACHER_CKPT may stay empty")


if __name__ == "__main__":
    main()
