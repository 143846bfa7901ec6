"""normkd-teachers against a local HTTP server on 127.0.0.1 serving a tar of the release's layout (never the network)."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch

from conftest import needs_mdistiller

pytestmark = needs_mdistiller

RESNET56 = "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
RESNET20 = "cifar_teachers/resnet20_vanilla/ckpt_epoch_240.pth"


def _release_ckpt(arch: str, seed: int = 0, like: str | None = None, extra=None) -> bytes:
    """A checkpoint as the release pickles it: {"model": state_dict} plus numpy scalars and a Namespace."""
    from mdistiller.models import cifar_model_dict

    torch.manual_seed(seed)
    model = cifar_model_dict[like or arch][0](num_classes=100)
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "epoch": np.int64(240), "accuracy": np.float64(72.3)}
    state["opt"] = argparse.Namespace(model=arch, learning_rate=0.05)
    if extra is not None:
        state["extra"] = extra
    torch.save(state, buf)
    return buf.getvalue()


class NotAllowed:
    """A pickled object the weights-only unpickler refuses (not a tensor, numpy scalar or Namespace)."""


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def release():
    """The bytes of a small tar of the release's layout (two architectures) and its members' hashes."""
    members = {RESNET56: _release_ckpt("resnet56"), RESNET20: _release_ckpt("resnet20")}
    return _tar(members), {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}


@pytest.fixture
def pinned(monkeypatch, release):
    """Pin the test tar's resnet56 as the 'published' hash (the real pin is for the release's resnet32x4)."""
    from normkd_plugin import teachers

    monkeypatch.setattr(teachers, "PUBLISHED_SHA256", {RESNET56: release[1][RESNET56]})


class _Server:
    """A 127.0.0.1 HTTP server of one file with Range support; ``cut`` bytes: the next response stops there."""

    def __init__(self, data: bytes):
        self.data, self.cut, self.requests = data, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                body = server.data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut is not None:
                    body, server.cut = body[: server.cut], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar_teachers.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(release):
    s = _Server(release[0])
    yield s
    s.close()


def _run(*argv):
    from normkd_plugin import teachers

    teachers.main(list(argv))


def test_download_verifies_installs_records_and_then_is_a_no_op(tmp_path, server, release, pinned, capsys):
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.checkpoints import load_weights

    dest = tmp_path / "download_ckpts"
    _run("--url", server.url, "--dest", str(dest))
    for name, digest in release[1].items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert (dest / "cifar_teachers.sha256").read_text() == "".join(
        f"{release[1][n]}  {n}\n" for n in sorted(release[1])
    )
    assert not (dest / "cifar_teachers.tar").exists() and not (dest / "cifar_teachers.tar.part").exists()
    load_weights(cifar_model_dict["resnet56"][0](num_classes=100), dest / RESNET56, "resnet56")
    out = capsys.readouterr().out
    assert "2 teachers in" in out and "DISTILLER.TEACHER_CKPT may stay empty" in out
    _run("--url", server.url, "--dest", str(dest))  # everything in place and verified: no request
    assert server.requests == [None] and "already in" in capsys.readouterr().out


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, server, release, pinned, capsys):
    dest = tmp_path / "d"
    server.cut = 1000
    with pytest.raises(SystemExit) as info:
        _run("--url", server.url, "--dest", str(dest))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "run the same command again to resume it" in err and "Traceback" not in err
    assert (dest / "cifar_teachers.tar.part").stat().st_size == 1000
    _run("--url", server.url, "--dest", str(dest))
    assert server.requests == [None, "bytes=1000-"]
    assert "resumed the download at 1,000 bytes" in capsys.readouterr().err
    assert hashlib.sha256((dest / RESNET20).read_bytes()).hexdigest() == release[1][RESNET20]


def test_offline_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as info:
        _run("--url", f"http://127.0.0.1:{port}/cifar_teachers.tar", "--dest", str(tmp_path / "d"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"normkd-teachers: cannot download http://127.0.0.1:{port}/cifar_teachers.tar: ")
    assert "--from FILE" in err[0] and not (tmp_path / "d").exists()  # nothing written


def test_from_a_file_and_the_published_pin(tmp_path, release, capsys):
    """--from takes a tar fetched by hand; with the real pin, a tar without the published resnet32x4 is refused."""
    tar = tmp_path / "cifar_teachers.tar"
    tar.write_bytes(release[0])
    with pytest.raises(SystemExit):
        _run("--from", str(tar), "--dest", str(tmp_path / "d"))
    assert "lacks cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth" in capsys.readouterr().err
    assert not (tmp_path / "d" / "cifar_teachers").exists() and tar.is_file()  # nothing installed, the file kept


def test_a_member_that_differs_from_the_published_hash_is_refused(tmp_path, monkeypatch, release, capsys):
    from normkd_plugin import teachers

    monkeypatch.setattr(teachers, "PUBLISHED_SHA256", {RESNET56: "0" * 64})
    tar = tmp_path / "t.tar"
    tar.write_bytes(release[0])
    with pytest.raises(SystemExit):
        _run("--from", str(tar), "--dest", str(tmp_path / "d"))
    assert f"{RESNET56} has SHA-256 {release[1][RESNET56]}, not the published {'0' * 64}" in capsys.readouterr().err
    assert not (tmp_path / "d" / "cifar_teachers").exists()


def test_a_later_file_that_differs_from_the_first_download_is_refused(tmp_path, release, pinned, capsys):
    dest = tmp_path / "d"
    first = tmp_path / "first.tar"
    first.write_bytes(release[0])
    _run("--from", str(first), "--dest", str(dest))
    changed = tmp_path / "changed.tar"
    changed.write_bytes(_tar({RESNET56: _release_ckpt("resnet56"), RESNET20: _release_ckpt("resnet20", seed=1)}))
    before = (dest / RESNET20).read_bytes()
    with pytest.raises(SystemExit):
        _run("--from", str(changed), "--dest", str(dest))
    err = capsys.readouterr().err
    assert f"{RESNET20} has SHA-256" in err and f"but the first download recorded {release[1][RESNET20]}" in err
    assert (dest / RESNET20).read_bytes() == before  # nothing replaced


@pytest.mark.parametrize(
    "case, message",
    [
        ("misfit", "does not fit mdistiller's resnet20: "),
        ("pickle", "refused to unpickle it: it holds"),
        ("unsafe", "unexpected member '../evil.pth'"),
        ("unknown", "mdistiller has no CIFAR model 'resnet999'"),
    ],
)
def test_members_that_do_not_verify_are_refused(tmp_path, release, pinned, case, message, capsys):
    good = {RESNET56: _release_ckpt("resnet56")}
    bad = {
        "misfit": {RESNET56: good[RESNET56], RESNET20: _release_ckpt("resnet20", like="resnet56")},
        "pickle": {**good, RESNET20: _release_ckpt("resnet20", extra=NotAllowed())},
        "unsafe": {**good, "../evil.pth": b"x"},
        "unknown": {**good, "cifar_teachers/resnet999_vanilla/ckpt_epoch_240.pth": b"x"},
    }[case]
    tar = tmp_path / "t.tar"
    tar.write_bytes(_tar(bad))
    with pytest.raises(SystemExit) as info:
        _run("--from", str(tar), "--dest", str(tmp_path / "d"))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d" / "cifar_teachers").exists()


def test_the_default_destination_is_where_mdistiller_looks():
    from mdistiller.models import cifar_model_dict

    from normkd_plugin.teachers import default_dest

    host = os.path.normpath(cifar_model_dict["resnet32x4"][1])
    assert host == str(default_dest() / "cifar_teachers" / "resnet32x4_vanilla" / "ckpt_epoch_240.pth")


def _refused(tar_bytes: bytes, tmp_path, capsys, dest=None) -> str:
    """Run --from a tar of ``tar_bytes``; the one line of its refusal (exit 2) after members it verified, nothing
    installed."""
    tar = tmp_path / "t.tar"
    tar.write_bytes(tar_bytes)
    dest = dest or tmp_path / "d"
    with pytest.raises(SystemExit) as info:
        _run("--from", str(tar), "--dest", str(dest))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and all(line.startswith("normkd-teachers: verified ") for line in err[:-1]), err
    assert not (dest / "cifar_teachers").exists() and not (dest / ".cifar_teachers.staging").exists()
    return err[-1]


def _sparse_gnu(name: str, stored: bytes, declared: int) -> bytes:
    """An old-GNU sparse member (type 'S', as GNU tar --sparse writes): ``stored`` at offset 0 of a file of
    ``declared`` bytes, the rest a hole that reads as zeros."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, len(stored))  # the first sparse region: offset, length
    header[483:495] = b"%011o\0" % declared  # the file's real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)  # the header checksum, counting its own field as spaces
    return bytes(header) + stored + b"\0" * (-len(stored) % 512) + b"\0" * 1024


def _sparse_pax(name: str, stored: bytes, declared: int) -> bytes:
    """A PAX 1.0 sparse member (GNU tar --sparse --format=posix): a sparse map, then ``stored``."""
    data = b"1\n0\n%d\n" % len(stored)
    data += b"\0" * (-len(data) % 512) + stored
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(declared),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("form", [_sparse_gnu, _sparse_pax], ids=["gnu", "pax"])
def test_a_sparse_member_is_refused_before_anything_is_written(tmp_path, capsys, form):
    """A 12 KB tar whose member expands to 3 GB when read: refused from its header, nothing staged."""
    tar = form(RESNET20, _release_ckpt("resnet20")[:10_000], 3_000_000_000)
    assert len(tar) < 25_000
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:  # the bomb is real: it reads as 3 GB
        assert t.getmember(RESNET20).size == 3_000_000_000
    line = _refused(tar, tmp_path, capsys)
    assert line == (
        f"normkd-teachers: {tmp_path / 't.tar'}: member {RESNET20!r} is a sparse file (declaring 3,000,000,000 "
        "bytes); refusing the archive"
    )


def test_a_member_larger_than_its_architecture_is_refused_before_anything_is_written(tmp_path, capsys):
    """resnet20's weights are 1.1 MB in float32: a checkpoint of it may declare 4 x that + 1 MiB, not 6 MiB."""
    from mdistiller.models import cifar_model_dict

    state = cifar_model_dict["resnet20"][0](num_classes=100).state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    limit = 4 * weights + 2**20
    assert 5_000_000 < limit < 6 << 20
    members = {RESNET56: _release_ckpt("resnet56"), RESNET20: b"\0" * (6 << 20)}
    line = _refused(_tar(members), tmp_path, capsys)
    assert line == (
        f"normkd-teachers: {tmp_path / 't.tar'}: member {RESNET20} declares {6 << 20:,} bytes, more than a "
        f"resnet20 checkpoint holds (at most {limit:,}); refusing the archive"
    )


def test_members_that_declare_too_much_in_all_are_refused(tmp_path, monkeypatch, release, capsys):
    from normkd_plugin import teachers

    total = sum(m.size for m in tarfile.open(fileobj=io.BytesIO(release[0])).getmembers())
    monkeypatch.setattr(teachers, "_MAX_TOTAL", total - 1)
    line = _refused(release[0], tmp_path, capsys)
    assert f"its 2 checkpoints declare {total:,} bytes in all, more than the {total - 1:,} allowed" in line


@pytest.mark.parametrize("kind", ["symlink", "hard link", "fifo"])
def test_links_and_special_members_are_refused(tmp_path, capsys, kind):
    info = tarfile.TarInfo(RESNET20)
    info.type = {"symlink": tarfile.SYMTYPE, "hard link": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = "/etc/passwd"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info)
    line = _refused(buf.getvalue(), tmp_path, capsys)
    assert f"member {RESNET20!r} is not a regular file" in line


def test_a_disk_too_small_for_the_teachers_is_refused_before_staging(tmp_path, release, pinned, capsys):
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        line = _refused(release[0], tmp_path, capsys, dest=disk)
    need = sum(len(_release_ckpt(a)) for a in ("resnet56", "resnet20")) / 1e6
    assert line == (
        f"normkd-teachers: {disk}/.cifar_teachers.staging: staging the teachers needs {need:.1f} MB, only 1.0 MB "
        "are free there; free space or give another --dest DIR"
    )


@pytest.mark.parametrize("how", ["real tmpfs", "simulated"])
def test_a_full_disk_while_staging_names_the_file(tmp_path, monkeypatch, capsys, how):
    """The declared sizes fit the free space, but the disk fills while the second member is written."""
    import contextlib
    import errno
    import shutil

    from conftest import mounted_tmpfs

    first = _release_ckpt("resnet56")
    # a second member that ends the tmpfs's last page exactly: the two files' partial pages need one page more
    second = b"\0" * (10 * 4096 + 4096 - len(first) % 4096)
    pages = (len(first) + len(second)) // 4096
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, str(pages * 4096)) if how == "real tmpfs" else contextlib.nullcontext(disk):
        disk.mkdir(exist_ok=True)
        if how == "simulated":
            copy = shutil.copyfileobj

            def full(src, dst, length=0):
                if dst.name.endswith(RESNET20):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                copy(src, dst, length)

            monkeypatch.setattr(shutil, "copyfileobj", full)
        line = _refused(_tar({RESNET56: first, RESNET20: second}), tmp_path, capsys, dest=disk)
    assert line == (
        f"normkd-teachers: {disk}/.cifar_teachers.staging/{RESNET20}: cannot write it, staging {RESNET20} of "
        f"{tmp_path / 't.tar'}: No space left on device (ENOSPC); free space there or give another --dest DIR"
    )


def test_a_downloaded_tar_is_kept_when_the_disk_is_at_fault(tmp_path, server, release, pinned, monkeypatch, capsys):
    """A full disk is not a bad download: the tar stays for the next try (a tar that fails verification does not)."""
    import shutil
    import types

    dest = tmp_path / "d"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(SystemExit):
        _run("--url", server.url, "--dest", str(dest))
    assert "only 0.0 MB are free there" in capsys.readouterr().err
    assert (dest / "cifar_teachers.tar").read_bytes() == release[0]


@pytest.mark.parametrize(
    "content, line, why",
    [
        (lambda good: good + b"0123abcd\n", 3, "'0123abcd' is not '<sha256>  cifar_teachers/<teacher>_vanilla/"),
        (lambda good: good[:70] + b"\xff\xfe\x00binary" + good[70:], 1, "not text (byte 0xff)"),
        (lambda good: good + good.splitlines(True)[0], 3, f"{RESNET20} is recorded twice"),
        (lambda good: b"\n".join([b"0" * 64 + b"  ../../etc/passwd"]), 1, "'" + "0" * 64 + "  ../../etc/passwd' is"),
        (lambda good: b"\n\n", None, "holds no hashes"),
    ],
    ids=["one token", "binary", "twice", "outside", "empty"],
)
def test_a_damaged_record_is_one_line_naming_the_file_and_line(tmp_path, release, pinned, capsys, content, line, why):
    dest = tmp_path / "d"
    tar = tmp_path / "t.tar"
    tar.write_bytes(release[0])
    _run("--from", str(tar), "--dest", str(dest))
    record = dest / "cifar_teachers.sha256"
    record.write_bytes(content(record.read_bytes()))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _run("--from", str(tar), "--dest", str(dest))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    where = f"{record}: line {line}: " if line else f"{record}: "
    assert err[0].startswith(f"normkd-teachers: {where}") and why in err[0]
    assert err[0].endswith("restore it, or delete it to record the hashes of the next install")
