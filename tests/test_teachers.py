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
