"""safe_pickle reads the data of a pickle (official Python 2 CIFAR files, Python 3 re-saves) and runs nothing in it."""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct

import numpy as np
import pytest

from normkd_plugin import safe_pickle


def _short(data: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING below 256 bytes, else BINSTRING."""
    return (b"U" + struct.pack("<B", len(data)) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


_PLAIN_DTYPE_STATE = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # no subarray, names, fields; elsize, align, flags


def py2_pickle(entry: dict, dtype_state: bytes = _PLAIN_DTYPE_STATE) -> bytes:
    """``entry`` as Python 2's ``cPickle.dump(entry, f, 2)`` writes it with numpy 1.x: the official files' format.

    Keys and strings are Python 2 strs, integers BININT, lists APPENDS, and an array numpy 1.x's
    ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` built by the state
    ``(1, shape, dtype(spec, 0, 1) built by (3, byteorder, <dtype_state>), is_fortran, raw bytes as a str)``.
    """

    def value(v) -> bytes:
        if isinstance(v, np.ndarray):
            order, spec = v.dtype.str[:1].encode(), v.dtype.str[1:].encode()
            dtype = b"cnumpy\ndtype\n" + _short(spec) + b"K\x00K\x01\x87R(K\x03" + _short(order) + dtype_state + b"b"
            shape = b"(" + b"".join(value(n) for n in v.shape) + b"t"
            head = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _short(b"b") + b"\x87R"
            return head + b"(K\x01" + shape + dtype + b"\x89" + _short(v.tobytes()) + b"tb"
        if isinstance(v, str):
            return _short(v.encode("latin1"))
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        return b"](" + b"".join(value(x) for x in v) + b"e"  # a list

    return b"\x80\x02}(" + b"".join(value(k) + value(v) for k, v in entry.items()) + b"u."


def official_entry(n: int = 6) -> dict:
    """A cifar-100-python train file's content (the official keys), with ``n`` images."""
    rng = np.random.default_rng(0)
    return {
        "filenames": [f"img_{i}.png" for i in range(n)],
        "batch_label": "training batch 1 of 1",
        "fine_labels": rng.integers(0, 100, n).tolist(),
        "coarse_labels": rng.integers(0, 20, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
def test_the_official_python2_layout_loads_as_pickle_loads_it(encoding):
    blob = py2_pickle(official_entry())
    reference = pickle.loads(blob, encoding=encoding)  # the trusted reader, on a file we wrote
    assert _equal(reference["data" if encoding == "latin1" else b"data"], official_entry()["data"])
    assert _equal(safe_pickle.load(io.BytesIO(blob), encoding=encoding), reference)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_python3_pickles_of_every_protocol_load(protocol):
    """Re-saved files: numpy 2's module names, bytes through _codecs (protocols 0-2), _frombuffer (protocol 5)."""
    entry = {
        **official_entry(),
        "labels": np.arange(6, dtype=np.int64),
        "big-endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "empty": np.zeros((0, 3072), np.uint8),
        "nested": [{"flags": np.array([True, False])}],
        "raw": b"\x00\xff",
    }
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(entry, protocol=protocol)))
    assert _equal(loaded, entry)
    assert loaded["fortran"].flags.f_contiguous


class Hostile:
    """What a hostile file holds: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("where", ["top", "value", "list item"])
def test_a_reduce_that_runs_a_command_is_refused_and_nothing_runs(tmp_path, protocol, where):
    marker = tmp_path / "ran"
    hostile = Hostile(marker)
    obj = {
        "top": hostile,
        "value": {"data": np.zeros((1, 3072), np.uint8), "fine_labels": hostile},
        "list item": {"fine_labels": [1, hostile]},
    }[where]
    blob = pickle.dumps(obj, protocol=protocol)
    pickle.loads(blob)  # the payload is live: the plain reader runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(safe_pickle.Refused) as refused:
        safe_pickle.load(io.BytesIO(blob))
    assert refused.value.name == f"{os.system.__module__}.system" and not marker.exists()


@pytest.mark.parametrize(
    "obj, refusal",
    [
        (np.array([1, "a"], dtype=object), r"^malformed numpy dtype 'O8': only b1, f2, .* are read$"),
        (np.zeros(2, dtype=[("x", "<i4")]), r"^malformed numpy dtype 'V4'"),  # a record array
        (np.array(["ab"]), r"^malformed numpy dtype 'U2'"),
        (np.float64(1.5), r"^numpy\._core\.multiarray\.scalar$"),  # a numpy scalar
        (eval, r"^(__builtin__|builtins)\.eval$"),
    ],
    ids=["object array", "record array", "string array", "numpy scalar", "eval"],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_anything_but_plain_data_and_numeric_arrays_is_refused(obj, refusal, protocol):
    with pytest.raises(pickle.UnpicklingError, match=refusal):
        safe_pickle.load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))


def test_a_dtype_state_numpy_would_trust_is_refused():
    """A 6-item dtype state (two Nones short): ``pickle.load`` of this file ends numpy 2.4.6's process with
    SIGSEGV (numpy's dtype.__setstate__ takes it); here it is refused before numpy sees it."""
    crafted = py2_pickle(
        {"data": np.zeros((2, 3072), np.uint8)}, dtype_state=b"NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    )
    with pytest.raises(pickle.UnpicklingError, match=r"^malformed numpy dtype state$"):
        safe_pickle.load(io.BytesIO(crafted))


def test_an_array_with_fewer_bytes_than_its_shape_is_refused_without_allocating_it():
    blob = py2_pickle({"data": np.zeros((1, 4), np.uint8)}).replace(
        b"J\x01\x00\x00\x00J\x04\x00\x00\x00", b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f"
    )
    with pytest.raises(
        pickle.UnpicklingError, match=r"^malformed numpy array: 4 bytes for shape \(2147483647, 2147483647\) of uint8$"
    ):
        safe_pickle.load(io.BytesIO(blob))


@pytest.mark.parametrize(
    "blob, raised",
    [
        (b"\x80\x02]q\x00(K\x01e", "EOFError"),  # truncated: no STOP
        (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"x.", "MemoryError"),  # a bytes length bomb
        (b"\x80\x02K\x01}b.", "AttributeError"),  # BUILD on an int
        (b"\x80\x02}(K\x01e.", "AttributeError"),  # APPENDS on a dict
    ],
    ids=["truncated", "length bomb", "build on int", "appends on dict"],
)
def test_damaged_opcodes_are_one_unpickling_error(blob, raised):
    with pytest.raises(pickle.UnpicklingError, match=rf"^malformed pickle \({raised}"):
        safe_pickle.load(io.BytesIO(blob))
