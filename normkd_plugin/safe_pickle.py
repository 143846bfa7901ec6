"""Pickles read as data: dicts, lists, strings, numbers and numeric numpy arrays; nothing in the file runs.

The official cifar-100-python files are Python 2 pickles of a dict of strings, lists and one uint8 array.
``pickle.load`` calls whatever a file names (``os.system`` in a ``__reduce__``), and numpy's own
reconstruction (``ndarray.__setstate__``, ``dtype.__setstate__``) trusts the file's state: a crafted one
crashes the process. Here a file may name only numpy's array and dtype reconstruction (``numpy.core`` and
``numpy._core``, pickle protocols 0-5) and what Python 3 writes bytes with at protocols 0-2 (the latin-1
``_codecs.encode``, and ``bytes()`` for b""); this module's code stands in for each, and builds arrays from a checked dtype, shape and
byte count.
"""

from __future__ import annotations

import math
import pickle
from typing import BinaryIO

import numpy as np

__all__ = ["Refused", "DType", "load", "scalar"]

# The dtypes a numeric array may have (no objects, strings, records or sub-arrays).
_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
_BYTE_ORDERS = frozenset({"<", ">", "|", "="})
# What the unpickler raises on damaged opcodes (a wrong stack, memo or length), besides UnpicklingError.
_MALFORMED = (AttributeError, EOFError, IndexError, KeyError, MemoryError, OverflowError, TypeError, ValueError)


class Refused(pickle.UnpicklingError):
    """A pickle that names a global outside the data types: ``name`` is ``module.name``; nothing was looked up."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _text(value):
    """A Python 2 str as text, whichever ``encoding`` read it."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _malformed(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"malformed numpy {what}")


class DType:
    """``numpy.dtype(spec, align, copy)`` and its pickled state read as a numeric dtype only: ``.dtype``.

    torch's weights-only unpickler takes it for ``numpy.dtype`` too (``checkpoints.allow_release_types``).
    """

    def __init__(self, spec, align=False, copy=True):
        spec = _text(spec)
        if spec not in _DTYPES:
            shown = repr(spec) if isinstance(spec, str) and len(spec) < 20 else type(spec).__name__
            raise _malformed(f"dtype {shown}: only {', '.join(sorted(_DTYPES))} are read")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]); a plain number has
        # no subarray, names or fields
        if not isinstance(state, tuple) or len(state) not in (8, 9) or _text(state[1]) not in _BYTE_ORDERS:
            raise _malformed("dtype state")
        if state[2:5] != (None, None, None):
            raise _malformed("dtype state (a record or sub-array)")
        if _text(state[1]) in "<>":
            self.dtype = self.dtype.newbyteorder(_text(state[1]))


class _Array:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)``, built by its pickled state into ``array``."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        # (version, shape, dtype, is_fortran, raw bytes), or the same without the version
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _malformed("array state")
        shape, dtype, fortran, raw = state
        if isinstance(raw, str):  # a Python 2 str, read as latin-1
            raw = raw.encode("latin1")
        self.array = _array(raw, dtype, shape, "F" if fortran else "C")


def _array(raw, dtype, shape, order) -> np.ndarray:
    """The array of ``shape`` reading ``raw``'s bytes as ``dtype``; exactly as many bytes as it holds."""
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(dtype, DType) or order not in ("C", "F"):
        raise _malformed("array")
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(type(n) is int and n >= 0 for n in shape):
        raise _malformed("array shape")
    count = math.prod(shape)
    if len(raw) != count * dtype.dtype.itemsize:
        raise _malformed(f"array: {len(raw)} bytes for shape {shape} of {dtype.dtype}")
    return np.frombuffer(raw, dtype=dtype.dtype, count=count).reshape(shape, order=order)


def scalar(dtype: DType, raw) -> np.generic:
    """``numpy.core.multiarray.scalar(dtype, raw)``: the one number of ``dtype`` that ``raw``'s bytes hold."""
    if not isinstance(dtype, DType) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise _malformed("scalar")
    return np.frombuffer(raw, dtype=dtype.dtype, count=1)[0]


class _NDArrayName:
    """What ``numpy.ndarray`` stands for: the only type ``_reconstruct`` accepts (no state, no attributes)."""

    __slots__ = ()


_NDARRAY = _NDArrayName()


def _reconstruct(subtype, shape, typecode) -> _Array:
    if subtype is not _NDARRAY:
        raise _malformed("array type")
    return _Array()


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:  # protocol 5's in-band arrays
    return _array(buffer, dtype, shape, _text(order))


def _latin1_bytes(text, encoding) -> bytes:  # how Python 3 pickles bytes at protocols 0-2
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _malformed("bytes")
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:  # how Python 3 pickles b"" at protocols 0-2 (``bytes(n)`` would allocate n)
    if args:
        raise _malformed("bytes")
    return b""


_GLOBALS = {
    ("numpy", "dtype"): DType,
    ("_codecs", "encode"): _latin1_bytes,
    **{(builtins, "bytes"): _empty_bytes for builtins in ("__builtin__", "builtins")},
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in ("numpy.core", "numpy._core")},
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        build = _GLOBALS.get((module, name))
        if build is None:
            raise Refused(f"{module}.{name}"[:200])
        # A fresh function per lookup: whatever a file's BUILD sets on it is gone with this load.
        return lambda *args: build(*args)


def _arrays_in_place(root):
    """``root`` with each array in its dicts' values and lists' items (at any depth) as the numpy array."""
    if isinstance(root, _Array):
        return _built(root)
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if not isinstance(obj, (dict, list)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        for key in list(obj.keys() if isinstance(obj, dict) else range(len(obj))):
            if isinstance(obj[key], _Array):
                obj[key] = _built(obj[key])
            else:
                stack.append(obj[key])
    return root


def _built(placeholder: _Array) -> np.ndarray:
    if placeholder.array is None:
        raise _malformed("array (its state is missing)")
    return placeholder.array


def load(file: BinaryIO, encoding: str = "latin1") -> object:
    """``pickle.load(file, encoding=...)`` for data only; Refused for any other global, UnpicklingError if malformed.

    Python 2 strings are decoded with ``encoding`` (``"bytes"`` keeps them bytes).
    """
    try:
        return _arrays_in_place(_DataUnpickler(file, encoding=encoding).load())
    except _MALFORMED as exc:
        raise pickle.UnpicklingError(f"malformed pickle ({type(exc).__name__}: {exc})"[:300]) from exc
