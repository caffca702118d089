"""The inert unpickler: a pickle's values as inert stand-ins, bounded before it runs.

Every global resolves through an explicit allowlist to an inert value (a tensor becomes a
:class:`TensorRef`, an OmegaConf ``DictConfig`` an :class:`InertObject` holding its state);
anything not on the list is refused with :class:`~sweeper.errors.UnsafePickle` naming it.
Nothing the file says is ever called.  The opcode walk counts what a pickle would allocate
before it is unpickled.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sweeper.errors import FileRefused, UnsafePickle

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------
# Inert pickle values.  Identity matters (shared storages, tied weights), so these compare by
# identity and the unpickler's memo hands out the same object for every reference.


def _no_build(cls: type[_T]) -> type[_T]:
    """Refuse pickle's BUILD on a value: dataclasses with slots bring a ``__setstate__`` that
    would set their fields, frozen or not."""

    def refuse(self: object, state: object) -> None:
        raise _MalformedPickle(f"{type(self).__name__} cannot take pickled state")

    cls.__setstate__ = refuse  # type: ignore[attr-defined]
    return cls


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class StorageType:
    name: str  # e.g. "FloatStorage"
    dtype: str  # e.g. "float32"
    itemsize: int


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class StorageRef:
    storage_type: StorageType
    key: str
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_type.itemsize


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class DtypeRef:
    name: str  # "float32", as in torch.float32


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class TensorRef:
    """A tensor as its pickle describes it: a view (offset, size, stride) of a storage."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    hooks: object
    metadata: object = None
    dtype: DtypeRef | None = None  # set only by _rebuild_tensor_v3

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.size:
            count *= dim
        return count


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class ParameterRef:
    data: TensorRef
    requires_grad: bool
    hooks: object
    state: object = None


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class DeviceRef:
    args: tuple[object, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class SizeRef:
    dims: tuple[int, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class TypeRef:
    """A class named as a value (OmegaConf metadata's ``typing.Any``, ``dict``): never called."""

    name: str


@dataclass(frozen=True, eq=False, slots=True)
class NumpyDtype:  # the one value BUILD may fill: numpy.dtype pickles its byte order
    args: tuple[object, ...]
    state: object = None

    def __setstate__(self, state: object) -> None:  # BUILD: numpy.dtype pickles its byte order
        object.__setattr__(self, "state", state)


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class NumpyScalar:
    dtype: object
    data: object


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class NumpyArray:
    args: tuple[object, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class PathValue:
    parts: tuple[object, ...]


class _Sealed(type):
    """Classes the pickle may name but never change: pickle's BUILD sets attributes on whatever
    object it is given, and a class is shared by every file sweeper reads."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise _MalformedPickle(f"{cls.__name__} cannot be changed")

    def __delattr__(cls, name: str) -> None:
        raise _MalformedPickle(f"{cls.__name__} cannot be changed")


class InertObject(metaclass=_Sealed):
    """An allowlisted class instance (OmegaConf containers and nodes): its state, and nothing else.

    The class defines no hooks at all, so ``NEWOBJ`` is a bare ``object.__new__`` and ``BUILD``
    stores the state in the instance's ``__dict__``, both inside the C unpickler: none of the
    real class's code runs, and calling the class with arguments (``REDUCE``) fails.
    """

    global_name = "?"

    @property
    def state(self) -> dict[str, object]:
        return self.__dict__


class InertOrderedDict(OrderedDict[Any, Any], metaclass=_Sealed):
    """``collections.OrderedDict`` whose pickled attributes (a state dict's ``_metadata``) are
    kept as data instead of being set through ``setattr``."""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _MalformedPickle("OrderedDict state is not a dict of attributes")
        self.attributes = dict(state)

    attributes: dict[str, object] = {}  # noqa: RUF012 - replaced per instance, never mutated


class InertDict(dict[Any, Any], metaclass=_Sealed):
    """An allowlisted ``dict`` subclass (Lightning's ``AttributeDict``): its items, and nothing
    else.  ``NEWOBJ`` makes a bare dict, ``SETITEMS`` fills it; none of the real class's code
    runs, and calling the class with arguments (``REDUCE``) fails."""

    global_name = "?"

    def __init__(self) -> None:
        super().__init__()


class InertDefaultDict(dict[Any, Any], metaclass=_Sealed):
    def __init__(self, factory: object = None, *args: object) -> None:
        super().__init__()
        if args:
            raise _MalformedPickle("defaultdict takes one argument")
        self.factory = factory


class _MalformedPickle(Exception):
    pass


_STORAGE_TYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8),
    "UntypedStorage": ("uint8", 1),
}
_DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex128",
    "complex64",
    "complex32",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "double",
    "float",
    "half",
    "long",
    "int",
    "short",
    "cfloat",
    "cdouble",
]


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if type(value) is not tuple:
        if not isinstance(value, SizeRef):
            raise _MalformedPickle(f"tensor {what} is not a tuple")
        value = value.dims
    for dim in value:  # a loop, not all(): called for every tensor of every file
        if type(dim) is not int or dim < 0:
            raise _MalformedPickle(f"tensor {what} holds a non-integer")
    return value


def _checked_tensor(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
    dtype: DtypeRef | None = None,
) -> TensorRef:
    if type(storage) is not StorageRef:
        raise _MalformedPickle("tensor without a storage record")
    if type(offset) is not int or offset < 0:
        raise _MalformedPickle("tensor storage offset is not a non-negative integer")
    dims, steps = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(dims) != len(steps):
        raise _MalformedPickle("tensor size and stride differ in length")
    if type(requires_grad) is not bool:
        raise _MalformedPickle("tensor requires_grad is not a bool")
    last = offset
    for dim, step in zip(dims, steps, strict=True):
        if not dim:  # an empty tensor reaches nothing
            break
        last += (dim - 1) * step
    else:
        if last >= storage.numel:
            raise _MalformedPickle("tensor reaches past the end of its storage")
    return TensorRef(storage, offset, dims, steps, requires_grad, hooks, metadata, dtype)


def _rebuild_tensor_v2(*args: object) -> TensorRef:
    if len(args) not in (6, 7):
        raise _MalformedPickle("_rebuild_tensor_v2 takes 6 or 7 arguments")
    metadata = args[6] if len(args) == 7 else None
    return _checked_tensor(args[0], args[1], args[2], args[3], args[4], args[5], metadata)


def _rebuild_tensor_v3(*args: object) -> TensorRef:
    if len(args) not in (7, 8):
        raise _MalformedPickle("_rebuild_tensor_v3 takes 7 or 8 arguments")
    dtype = args[6]
    if not isinstance(dtype, DtypeRef):
        raise _MalformedPickle("_rebuild_tensor_v3 dtype is not a torch dtype")
    metadata = args[7] if len(args) == 8 else None
    return _checked_tensor(args[0], args[1], args[2], args[3], args[4], args[5], metadata, dtype)


def _rebuild_parameter(*args: object) -> ParameterRef:
    if len(args) not in (3, 4) or not isinstance(args[0], TensorRef):
        raise _MalformedPickle("_rebuild_parameter takes a tensor")
    if not isinstance(args[1], bool):
        raise _MalformedPickle("_rebuild_parameter requires_grad is not a bool")
    return ParameterRef(args[0], args[1], args[2], args[3] if len(args) == 4 else None)


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _MalformedPickle("_codecs.encode used for something other than bytes")
    return codecs.encode(text, encoding)


def _bytearray(data: object = b"", *rest: object) -> bytearray:
    # Only from bytes (or latin-1 text, protocol 2's spelling): bytearray(10**12) would be a way
    # to make sweeper allocate whatever a hostile file asks for.
    if isinstance(data, str) and rest in ((), ("latin-1",), ("latin1",)):
        return bytearray(data, "latin-1")
    if not isinstance(data, bytes) or rest:
        raise _MalformedPickle("bytearray built from something other than bytes")
    return bytearray(data)


def _inert_class(global_name: str) -> type[InertObject]:
    return type(global_name.rpartition(".")[2], (InertObject,), {"global_name": global_name})


def _inert_dict(global_name: str) -> type[InertDict]:
    return type(global_name.rpartition(".")[2], (InertDict,), {"global_name": global_name})


def _make(factory: Callable[..., object]) -> Callable[..., object]:
    def call(*args: object) -> object:
        return factory(args)

    return call


def _allowed_globals() -> dict[str, object]:
    allowed: dict[str, object] = {
        "collections.OrderedDict": InertOrderedDict,
        "collections.defaultdict": InertDefaultDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.device": _make(DeviceRef),
        "torch.Size": lambda dims=(): SizeRef(_int_tuple(tuple(dims), "size")),
        "_codecs.encode": _codecs_encode,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": _bytearray,
        "pathlib.PosixPath": _make(PathValue),
        "pathlib.Path": _make(PathValue),
        "typing.Any": TypeRef("typing.Any"),
        "argparse.Namespace": _inert_class("argparse.Namespace"),
        # Lightning's hyper-parameters (1.x pickled them as this dict subclass).
        "lightning.fabric.utilities.data.AttributeDict": _inert_dict(
            "lightning.fabric.utilities.data.AttributeDict"
        ),
        "lightning_fabric.utilities.data.AttributeDict": _inert_dict(
            "lightning_fabric.utilities.data.AttributeDict"
        ),
        "lightning.pytorch.utilities.parsing.AttributeDict": _inert_dict(
            "lightning.pytorch.utilities.parsing.AttributeDict"
        ),
        "pytorch_lightning.utilities.parsing.AttributeDict": _inert_dict(
            "pytorch_lightning.utilities.parsing.AttributeDict"
        ),
    }
    for name, (dtype, itemsize) in _STORAGE_TYPES.items():
        allowed[f"torch.{name}"] = StorageType(name, dtype, itemsize)
    for dtype in _DTYPES:
        allowed[f"torch.{dtype}"] = DtypeRef(dtype)
    for builtin in ("dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "object"):
        allowed[f"builtins.{builtin}"] = TypeRef(builtin)
    for omegaconf_class in (
        "dictconfig.DictConfig",
        "listconfig.ListConfig",
        "base.ContainerMetadata",
        "base.Metadata",
        "nodes.AnyNode",
        "nodes.StringNode",
        "nodes.IntegerNode",
        "nodes.FloatNode",
        "nodes.BooleanNode",
        "nodes.BytesNode",
        "nodes.PathNode",
        "nodes.UnionNode",
        "nodes.InterpolationResultNode",
    ):
        name = f"omegaconf.{omegaconf_class}"
        allowed[name] = _inert_class(name)
    for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{numpy_core}.scalar"] = lambda dtype, data=None: NumpyScalar(dtype, data)
        allowed[f"{numpy_core}._reconstruct"] = _make(NumpyArray)
    allowed["numpy.dtype"] = _make(NumpyDtype)
    allowed["numpy.ndarray"] = TypeRef("numpy.ndarray")
    return allowed


_PY2_BUILTINS = {"long": "int", "unicode": "str"}


@_no_build
@dataclass(frozen=True, slots=True)
class _Callable:
    """An allowlisted function as the pickle sees it: callable, and nothing else to touch."""

    function: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.function(*args)


def _shareable(allowed: object) -> object:
    """An allowlisted global as every file's unpickling may share it: nothing a pickle can reach
    is changeable.  Classes are sealed (``_Sealed``), values frozen with slots and no BUILD
    (``_no_build``), builtin types read-only; functions are wrapped in a frozen ``_Callable``.
    So a hostile file can never alter how the next user's file is read or verified."""
    if isinstance(allowed, type) or dataclasses.is_dataclass(allowed):
        return allowed
    if callable(allowed):
        return _Callable(allowed)
    raise AssertionError(f"unshareable allowlist entry {allowed!r}")


_ALLOWED_GLOBALS = {name: _shareable(value) for name, value in _allowed_globals().items()}


# ---------------------------------------------------------------------------------------------
# The opcode walk: what a pickle would make the unpickler allocate, counted before it runs.
#
# CPython's unpickler allocates as it goes, and a few bytes of pickle can ask for a lot: a list
# of 40M small ints is an 80 MB data.pkl that costs gigabytes once unpickled, fingerprinted and
# compared, and ``LONG_BINPUT 0x7fffffff`` sizes the memo at 16 GiB before any allowlist is
# asked.  So every opcode is stepped over, never executed, and what it would do to the
# unpickler's stack, memo and containers is counted; a file past any bound is refused unread.
#
# The bounds are far above what torch.save writes for any real checkpoint.  Measured (torch
# 2.13): a Llama-2-7B-shaped state dict (291 tensors) with its AdamW state is 36k opcodes, 19k
# objects, 19k container items, 8k memo entries and a stack 595 deep; each parameter adds ~125
# opcodes, ~62 objects, ~66 items and ~28 memo entries (its tensor, and its optimizer entry with
# three tensors).  A model of 100,000 parameter tensors with AdamW state, beyond any single-file
# checkpoint seen in practice, is 12.5M opcodes, 6.3M objects, 6.6M items, 2.8M memo entries and
# a stack 2k deep (pickle writes containers in batches of 1000): under every bound.  At the
# bounds unpickling may still cost ~1 GiB, which classification pays in a worker process under
# an address-space limit (see sweeper.inventory).
_MAX_PICKLE_OPCODES = 16_000_000
_MAX_PICKLE_OBJECTS = 8_000_000  # values made: literals, containers, instances, call results
_MAX_CONTAINER_ITEMS = 8_000_000  # references put into lists, dicts, tuples and instances
_MAX_MEMO_ENTRIES = 4_000_000
# Values (and marks) on the unpickler's stack at once: how deeply the data nests, and the
# largest container written in one piece (a tuple: lists, dicts and sets come in batches).
_MAX_STACK_DEPTH = 1_000_000
# Each opcode is at least a byte and adds at most one to any count, so a shorter pickle cannot
# pass a bound: under an address-space limit, where a huge memo index fails as a MemoryError
# (a refused file), it need not be walked.
_WALK_ALWAYS_BYTES = min(
    _MAX_PICKLE_OPCODES,
    _MAX_PICKLE_OBJECTS,
    _MAX_CONTAINER_ITEMS,
    _MAX_MEMO_ENTRIES,
    _MAX_STACK_DEPTH,
)
_CHECK_EVERY = 65_536  # opcodes between looks at the counts (each grows by at most 1 an opcode)

# How to step over each opcode's argument: a size for fixed arguments, or a negative code.  The
# opcodes that involve a MARK have codes of their own (INST steps over its two lines too).
(
    _LENGTH1, _LENGTH4, _LENGTH8, _ONE_LINE, _TWO_LINES, _PUT4, _PUT_LINE, _STOP, _MARK,
    _MARK_TO_VALUE, _MARK_INTO, _POP, _POP_MARK, _INST, _BAD,
) = (-1, -4, -8, -10, -11, -12, -13, -14, -20, -21, -22, -23, -24, -25, -99)  # fmt: skip
_STEP = [_BAD] * 256
for _ops, _step in (
    (b")2NRabs}]\x81\x85\x86\x87\x88\x89\x92\x93\x94Q", 0),
    (b"Khq\x80\x82", 1), (b"M\x83", 2), (b"Jj\x84", 4), (b"G\x95", 8),
    (b"UC\x8c\x8a", _LENGTH1), (b"TXB\x8b", _LENGTH4), (b"\x8d\x8e\x96", _LENGTH8),
    (b"IFLSVgP", _ONE_LINE), (b"c", _TWO_LINES), (b"r", _PUT4), (b"p", _PUT_LINE), (b".", _STOP),
    (b"(", _MARK), (b"tldo", _MARK_TO_VALUE), (b"eu", _MARK_INTO), (b"0", _POP),
    (b"1", _POP_MARK), (b"i", _INST),
):  # fmt: skip
    for _op in _ops:
        _STEP[_op] = _step

# What every other opcode does: its change to the stack's depth, and one number tallying the
# objects it makes, the container items it stores and the memo entries it adds, packed so that
# the walk pays one addition per opcode (no field can reach 2**25 between two looks).
_ITEM, _MEMO, _FIELD = 1 << 25, 1 << 50, (1 << 25) - 1
_DEPTH = [0] * 256
_TALLY = [0] * 256
for _ops, _depth, _tally in (
    (b"IJKLFGNPSTUVXBC})]c\x88\x89\x8a\x8b\x8c\x8d\x8e\x96\x82\x83\x84", 1, 1),  # a new value
    (b"2ghj", 1, 0),  # another reference to a value already made
    (b"R\x81\x93", -1, 1),  # a call or a class: two values in, one out
    (b"Q", 0, 1),  # BINPERSID: a persistent id in, a storage out
    (b"\x92", -2, 1),  # NEWOBJ_EX: class, args and kwargs in, the instance out
    (b"a", -1, _ITEM), (b"s", -2, 2 * _ITEM), (b"b", -1, _ITEM),  # APPEND, SETITEM, BUILD
    (b"\x85", 0, 1 + _ITEM), (b"\x86", -1, 1 + 2 * _ITEM), (b"\x87", -2, 1 + 3 * _ITEM),
    (b"pqr\x94", 0, _MEMO),
):  # fmt: skip
    for _op in _ops:
        _DEPTH[_op], _TALLY[_op] = _depth, _tally


_memo_walk_needed = True


def rely_on_address_space_limit() -> None:
    """For a worker process whose RLIMIT_AS is set: an oversized memo then fails as MemoryError
    (a refused file), so small pickles, which cannot pass any bound, need no walk."""
    global _memo_walk_needed
    _memo_walk_needed = False


def _check_pickle(data: bytes, path: str) -> None:
    """Walk the opcodes of ``data`` and refuse it (:class:`FileRefused`, naming the bound) when
    it would make the unpickler allocate more than the bounds above allow, or when a memo index
    a PUT names is beyond the number of PUTs so far (+256), as no pickler writes them: CPython
    sizes its memo by the largest index it is given.  Allocates nothing that grows with the
    pickle but its list of open MARKs, itself bounded."""
    i, end, puts, ops, depth, tally = 0, len(data), 0, 0, 0, 0
    marks: list[int] = []
    look = _CHECK_EVERY
    step, depths, tallies, unpack = _STEP, _DEPTH, _TALLY, struct.unpack_from
    try:
        while i < end:
            op = data[i]
            size = step[op]
            i += 1
            ops += 1
            if ops >= look:
                _check_counts(ops, tally, depth + len(marks), path)
                look += _CHECK_EVERY
            if size >= 0:
                i += size
            elif size == _LENGTH4:
                i += 4 + unpack("<I", data, i)[0]
            elif size == _PUT4:
                if unpack("<I", data, i)[0] > puts + 256:
                    raise _Malformed("memo index out of sequence")
                puts += 1
                i += 4
            elif size == _LENGTH1:
                i += 1 + data[i]
            elif size == _MARK:
                marks.append(depth)
            elif size in (_MARK_INTO, _MARK_TO_VALUE, _INST):
                if size == _INST:
                    i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
                if not marks:
                    raise _Malformed("no MARK to build to")
                items = depth - marks.pop()
                if items < 0:
                    raise _Malformed("stack underflow")
                tally += items * _ITEM
                depth -= items
                if size != _MARK_INTO:  # the values between the mark make one new value
                    depth += 1
                    tally += 1
            elif size == _POP:
                if marks and marks[-1] == depth:
                    marks.pop()
                else:
                    depth -= 1
            elif size == _POP_MARK:
                if not marks:
                    raise _Malformed("no MARK to pop")
                depth = marks.pop()
            elif size == _STOP:
                _check_counts(ops, tally, depth + len(marks), path)
                return
            elif size == _ONE_LINE:
                i = data.index(b"\n", i) + 1
            elif size == _TWO_LINES:
                i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
            elif size == _PUT_LINE:
                newline = data.index(b"\n", i)
                if int(data[i:newline]) > puts + 256:
                    raise _Malformed("memo index out of sequence")
                puts += 1
                i = newline + 1
            elif size == _LENGTH8:
                i += 8 + unpack("<Q", data, i)[0]
            else:  # not an opcode torch writes: let nothing this odd reach the unpickler
                raise _Malformed(f"opcode {op:#04x} is not allowed")
            depth += depths[op]
            tally += tallies[op]
    except (ValueError, struct.error, IndexError):
        raise FileRefused(path, "malformed pickle in data.pkl: cut short") from None
    except _Malformed as error:
        raise FileRefused(path, f"malformed pickle in data.pkl: {error}") from None
    raise FileRefused(path, "malformed pickle in data.pkl: no STOP opcode")


class _Malformed(Exception):
    pass


def _check_counts(ops: int, tally: int, depth: int, path: str) -> None:
    """Refuse the file if a count passed its bound; the reason names the bound."""
    objects, items, memo = tally & _FIELD, (tally >> 25) & _FIELD, tally >> 50
    for count, bound, what in (
        (ops, _MAX_PICKLE_OPCODES, "opcodes"),
        (objects, _MAX_PICKLE_OBJECTS, "objects"),
        (items, _MAX_CONTAINER_ITEMS, "container items"),
        (memo, _MAX_MEMO_ENTRIES, "memo entries"),
        (depth, _MAX_STACK_DEPTH, "values on the stack at once (nesting)"),
    ):
        if count > bound:
            raise FileRefused(
                path,
                f"refused: data.pkl has more than {bound:,} {what}, more than any real checkpoint",
            )
    if depth < 0:
        raise _Malformed("stack underflow")


_PREFETCH_BYTES = 64 * 1024


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        # A reader with ``peek``: the C unpickler then decodes from chunks it prefetches, where
        # from a bare BytesIO it calls ``read`` for every opcode (half the time of a small file).
        super().__init__(io.BufferedReader(io.BytesIO(data), _PREFETCH_BYTES), encoding="utf-8")
        self._path = path
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            module, name = "builtins", _PY2_BUILTINS.get(name, name)
        qualified = f"{module}.{name}"
        try:
            return _ALLOWED_GLOBALS[qualified]
        except KeyError:
            raise UnsafePickle(self._path, qualified) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _MalformedPickle(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not StorageType:
            raise _MalformedPickle("storage of an unknown type")
        if not (type(key) is str and type(location) is str and type(numel) is int):
            raise _MalformedPickle("malformed storage reference")
        if numel < 0:
            raise _MalformedPickle("negative storage size")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = StorageRef(storage_type, key, location, numel)
        return known


# Why a file is refused when reading it runs out of memory: in a worker process, that is its
# address-space limit (classify_memory_limit); the same words wherever it happens.
MEMORY_REFUSAL = "refused: reading it needs more memory than sweeper allows (classify_memory_limit)"


def load_inert(data: bytes, path: str) -> object:
    """Unpickle ``data`` into inert values; nothing in it is ever executed."""
    return _load_inert(data, path)[0]


def _load_inert(data: bytes, path: str) -> tuple[object, list[StorageRef]]:
    """The inert root object and every storage the pickle references."""
    # Bounded before anything is allocated: workers under an address-space limit skip the walk
    # for pickles too small to pass a bound (the limit turns a huge memo into a refusal).
    if _memo_walk_needed or len(data) >= _WALK_ALWAYS_BYTES:
        _check_pickle(data, path)
    try:
        unpickler = _InertUnpickler(data, path)
        return unpickler.load(), list(unpickler.storages.values())
    except UnsafePickle:
        raise
    except (_MalformedPickle, pickle.UnpicklingError, ValueError, TypeError, EOFError) as error:
        raise FileRefused(path, f"malformed pickle in data.pkl: {error}") from None
    except (AttributeError, IndexError, KeyError, RecursionError) as error:
        raise FileRefused(
            path, f"malformed pickle in data.pkl: {type(error).__name__}: {error}"
        ) from None
    except MemoryError:
        raise FileRefused(path, MEMORY_REFUSAL) from None


# ---------------------------------------------------------------------------------------------
# Reading inert values.


def as_number(value: object) -> int | float | None:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, NumpyScalar):
        return numpy_scalar_value(value)
    return None


def numpy_scalar_value(value: NumpyScalar) -> int | float | bool | None:
    dtype = value.dtype
    if not isinstance(dtype, NumpyDtype) or not dtype.args or not isinstance(dtype.args[0], str):
        return None
    code = dtype.args[0]
    data = value.data
    formats = {
        "f8": "d",
        "f4": "f",
        "f2": "e",
        "i8": "q",
        "i4": "i",
        "i2": "h",
        "i1": "b",
        "u8": "Q",
        "u4": "I",
        "u2": "H",
        "u1": "B",
        "b1": "?",
    }
    if code not in formats or not isinstance(data, bytes):
        return None
    fmt = "<" + formats[code]
    if len(data) != struct.calcsize(fmt):
        return None
    number: int | float | bool = struct.unpack(fmt, data)[0]
    return number


def walk_values(value: object, seen: set[int] | None = None) -> Iterator[object]:
    """Every value reachable from ``value``, each object once (iterative: pickles can nest deep)."""
    seen = set() if seen is None else seen
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
            if isinstance(item, InertOrderedDict):
                stack.extend(item.attributes.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif isinstance(item, TensorRef):
            stack.extend((item.storage, item.hooks, item.metadata))
        elif isinstance(item, ParameterRef):
            stack.extend((item.data, item.hooks, item.state))
        elif isinstance(item, InertObject):
            stack.append(item.state)
        elif isinstance(item, NumpyScalar | NumpyArray):
            stack.append(item.data if isinstance(item, NumpyScalar) else item.args)
