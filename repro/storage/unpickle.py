"""Read NVlabs EDM / EDM2 network pickles as *data*, without executing anything they carry.

The released EDM (and EDM2, DDO) checkpoints are pickles written with NVlabs' ``torch_utils.persistence``:
every decorated object (networks, their layers, the loss, the augmentation pipe) is pickled as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with

    meta = {'type': 'class', 'version': 6, 'module_src': <full Python source of the defining module>,
            'class_name': <name in that module>, 'state': <the object's __dict__>}

A normal ``pickle.load`` would ``exec`` ``module_src``.  Here a restricted unpickler resolves only an explicit
allow-list of globals (:data:`ALLOWED_GLOBALS`) and turns each persistent object into a
:class:`PersistentRecord` holding ``state`` as plain data (``_parameters``, ``_buffers``, ``_modules``,
``_init_args``, ``_init_kwargs``...).  Plain torch containers that are not persistent (``torch.nn.ModuleDict``
etc.) become :class:`TorchModuleRecord`.  Tensors are rebuilt from their serialized bytes: plain pickling of a
tensor stores ``torch._utils._rebuild_tensor_v2(storage, ...)`` where the storage is
``torch.storage._load_from_bytes(<legacy torch.save blob>)``; that nested blob is parsed here by
:func:`_parse_legacy_storage_blob` with its own (smaller) allow-list, never by ``torch.load``.

Any other global -- and any call (REDUCE / NEWOBJ / INST / OBJ) or BUILD on something outside the
allow-list -- raises :class:`UnsafePickleError` before it can run.

Public API::

    data = read_edm_pickle(path, expected_sha256=None)        # {'ema': PersistentRecord, ...}
    sd = state_dict_from_record(data['ema'])                  # {name: tensor}, torch state_dict names
    arch = arch_from_record(data['ema'])                      # JSON arch for repro.nets.edm.build_network
    summary = convert_edm_pickle(src, dst, expected_sha256=None, key='ema')   # -> our safetensors format

Networks that convert: EDM's ``EDMPrecond`` / ``VPPrecond`` around ``SongUNet`` (top level: a plain dict
``{ema, loss_fn, augment_pipe, dataset_kwargs}``) and EDM2's ``Precond`` around ``UNet`` (top level: a
``dnnlib.util.EasyDict`` ``{encoder, dataset_kwargs, loss_fn, ema}``, ``ema`` in float16; it becomes
``precond='edm2'`` for :func:`repro.nets.factory.build_network`, stored as float32 -- see
:func:`convert_edm_pickle` for what that means for EDM2's float16 gains).  EDM2's ``encoder`` is data only:
:func:`describe_record` reports its class and settings (e.g. which VAE decodes the latents).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import hashlib
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = [
    "UnsafePickleError",
    "PersistentRecord",
    "TorchModuleRecord",
    "EasyDict",
    "ALLOWED_GLOBALS",
    "read_edm_pickle",
    "loads_edm_pickle",
    "state_dict_from_record",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list; it was refused before anything ran."""


# ----------------------------------------------------------------------------------------------------------
# Data records.


_HINTS = {
    # Facts about where upstream defines these classes (used only as a label; nothing is imported).
    "training.networks": {"EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet",
                          "UNetBlock", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding"},
    "training.loss": {"EDMLoss", "VPLoss", "VELoss"},
    "training.augment": {"AugmentPipe"},
    "training.networks_edm2": {"Precond", "UNet", "Block", "MPConv", "MPFourier"},
    "training.encoders": {"StandardRGBEncoder", "StabilityVAEEncoder"},
    "training.training_loop": {"EDM2Loss"},
}


def _module_name_hint(class_name: str, module_src: Any) -> Optional[str]:
    """A label for where the class came from, guessed from its name (None if unknown or not in the source)."""
    if not isinstance(module_src, str) or f"class {class_name}" not in module_src:
        return None
    for module, names in _HINTS.items():
        if class_name in names:
            return module
    return None


class Record:
    """Common accessors of :class:`PersistentRecord` and :class:`TorchModuleRecord`."""

    class_name: str
    state: dict

    @property
    def is_module(self) -> bool:
        """True when the state looks like a ``torch.nn.Module.__dict__``."""
        return isinstance(self.state, dict) and "_parameters" in self.state and "_modules" in self.state

    @property
    def init_args(self) -> Optional[tuple]:
        """Positional constructor arguments recorded by ``torch_utils.persistence`` (None if not recorded)."""
        return self.state.get("_init_args") if isinstance(self.state, dict) else None

    @property
    def init_kwargs(self) -> Optional[dict]:
        """Keyword constructor arguments recorded by ``torch_utils.persistence`` (None if not recorded)."""
        return self.state.get("_init_kwargs") if isinstance(self.state, dict) else None

    @property
    def submodules(self) -> dict:
        return dict(self.state.get("_modules") or {}) if self.is_module else {}


@dataclass(repr=False)
class PersistentRecord(Record):
    """One object pickled by ``torch_utils.persistence``, kept as data (its source is never run).

    ``module_name_hint``: where upstream defines ``class_name`` (a guess from the name, None if unknown);
    ``version``: the persistence format version (6 for EDM/EDM2); ``state``: the object's ``__dict__``;
    ``module_src_sha256``/``module_src_chars`` identify the embedded source without keeping it.
    """

    class_name: str
    module_name_hint: Optional[str]
    version: Any
    state: dict
    module_src_sha256: Optional[str] = None
    module_src_chars: int = 0
    meta_type: str = "class"

    def __repr__(self) -> str:
        kind = "module" if self.is_module else "object"
        return f"PersistentRecord({self.class_name!r}, {kind}, version={self.version!r})"


class TorchModuleRecord(Record):
    """A plain (non-persistent) torch container such as ``torch.nn.ModuleDict``, kept as data.

    Created by the NEWOBJ + BUILD opcodes of the pickle; ``__setstate__`` only stores the state.
    """

    class_name = "torch.nn.Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.class_name}: unexpected state of type {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"TorchModuleRecord({self.class_name!r})"


_TORCH_CONTAINERS = {
    f"torch.nn.modules.container.{name}": type(name + "Record", (TorchModuleRecord,),
                                               {"class_name": f"torch.nn.modules.container.{name}"})
    for name in ("ModuleDict", "ModuleList", "Sequential")
}


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


# ----------------------------------------------------------------------------------------------------------
# Safe replacements for the globals the pickles name.


_SRC_HASHES: dict[int, tuple[str, str]] = {}


def _record_persistent_obj(meta: Any) -> PersistentRecord:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: returns data, runs nothing."""
    if not isinstance(meta, dict):
        raise UnsafePickleError(f"_reconstruct_persistent_obj: meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in ("type", "version", "module_src", "class_name", "state") if k not in meta]
    if missing:
        raise ValueError(f"_reconstruct_persistent_obj: meta lacks {missing}")
    if meta["type"] != "class":
        raise ValueError(f"_reconstruct_persistent_obj: meta type {meta['type']!r} is not supported (only 'class')")
    src = meta["module_src"]
    class_name = meta["class_name"]
    if not isinstance(class_name, str):
        raise ValueError("_reconstruct_persistent_obj: class_name is not a string")
    state = meta["state"]
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ValueError(f"{class_name}: persistent state is a {type(state).__name__}, expected a dict")
    digest, chars = "", 0
    if isinstance(src, str):
        cached = _SRC_HASHES.get(id(src))
        if cached is None or cached[0] is not src:
            cached = (src, hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest())
            _SRC_HASHES.clear()
            _SRC_HASHES[id(src)] = cached
        digest, chars = cached[1], len(src)
    return PersistentRecord(
        class_name=class_name,
        module_name_hint=_module_name_hint(class_name, src),
        version=meta["version"],
        state=dict(state),
        module_src_sha256=digest or None,
        module_src_chars=chars,
    )


class _Storage:
    """A deserialized storage: a flat 1-D tensor of the storage's dtype."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


def _check_hooks(hooks: Any, where: str) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or len(hooks)):
        raise UnsafePickleError(f"{where}: tensor carries backward hooks; refused")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> torch.Tensor:
    """Safe version of ``torch._utils._rebuild_tensor_v2``: a strided view of a parsed storage."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"_rebuild_tensor_v2: storage is a {type(storage).__name__}, not a parsed storage")
    _check_hooks(backward_hooks, "_rebuild_tensor_v2")
    try:
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError) as e:
        raise ValueError(f"_rebuild_tensor_v2: bad size/stride/offset: {e}") from None
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"_rebuild_tensor_v2: bad geometry size={size} stride={stride} offset={offset}")
    numel = storage.data.numel()
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise ValueError(f"_rebuild_tensor_v2: view size={size} stride={stride} offset={offset} "
                         f"exceeds the storage of {numel} elements")
    if math.prod(size) == 0:
        return torch.empty(size, dtype=storage.data.dtype)
    return storage.data.as_strided(size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> torch.Tensor:
    """Safe version of ``torch._utils._rebuild_parameter``: parameters are returned as plain tensors."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"_rebuild_parameter: data is a {type(data).__name__}, not a tensor")
    _check_hooks(backward_hooks, "_rebuild_parameter")
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None) -> torch.Tensor:
    """Safe version of ``torch._utils._rebuild_parameter_with_state`` (the extra attribute state is dropped)."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: only str -> latin1 bytes."""
    if not isinstance(obj, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode: only (str, 'latin1') is allowed")
    return codecs.encode(obj, "latin1", errors if errors == "strict" else "strict")


_np_multiarray = getattr(np, "_core", None) or np.core  # numpy 2: np._core; numpy 1.x: np.core


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError("numpy scalar: first argument is not a numpy dtype")
    if data is None:
        return _np_multiarray.multiarray.scalar(dtype)
    return _np_multiarray.multiarray.scalar(dtype, data)


def _np_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct: only numpy.ndarray may be built, got {cls!r}")
    return _np_multiarray.multiarray._reconstruct(np.ndarray, shape, dtype_code)


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    """Safe version of numpy's ``_frombuffer``: how numpy pickles a contiguous array with protocol 5.

    ``pickle.dump(..., protocol=5)`` (the default from Python 3.14) writes an ndarray as
    ``numpy._core.numeric._frombuffer(<in-band bytes>, dtype, shape, order[, axis_order])``.  Only raw
    bytes, a non-object dtype and integer shapes are accepted; the array is a copy of the bytes.
    """
    if not isinstance(buf, (bytes, bytearray)):
        raise UnsafePickleError(f"numpy _frombuffer: buffer is a {type(buf).__name__}, not in-band bytes")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy _frombuffer: dtype must be a numpy dtype without objects")
    if (not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or order not in ("C", "F", "K")):
        raise UnsafePickleError("numpy _frombuffer: shape must be a tuple of ints and order one of C/F/K")
    arr = np.frombuffer(bytearray(buf), dtype=dtype)
    if order == "K" and axis_order is not None:
        if not isinstance(axis_order, tuple) or sorted(axis_order) != list(range(len(shape))):
            raise UnsafePickleError("numpy _frombuffer: axis_order is not a permutation of the axes")
        return arr.reshape(shape, order="C").transpose(axis_order)
    return arr.reshape(shape, order=order)


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if not isinstance(spec, str):
        raise UnsafePickleError("numpy dtype: only a dtype string is allowed")
    return np.dtype(spec, bool(align), bool(copy))


def _torch_device(spec: Any, index: Any = None) -> torch.device:
    if not isinstance(spec, str) or not (index is None or isinstance(index, int)):
        raise UnsafePickleError("torch.device: only (str[, int]) is allowed")
    return torch.device(spec) if index is None else torch.device(spec, index)


def _torch_size(dims: Any = ()) -> torch.Size:
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        raise UnsafePickleError("torch.Size: only a tuple of ints is allowed")
    return torch.Size(dims)


def _builtin_container(kind: type) -> Callable:
    def make(items: Any = ()) -> Any:
        if not isinstance(items, (list, tuple)):
            raise UnsafePickleError(f"{kind.__name__}: only a list/tuple of items is allowed")
        return kind(items)
    make.__name__ = kind.__name__
    return make


_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
                 "bool", "complex64", "complex128", "half", "float", "double", "long", "int", "short")
}

# module.name -> object the unpickler receives.  Callables here are OUR functions (or harmless
# constructors); nothing from torch's or numpy's pickle machinery is called directly except where
# wrapped with argument checks.
ALLOWED_GLOBALS: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _record_persistent_obj,
    "dnnlib.util.EasyDict": EasyDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch.storage._load_from_bytes": None,  # filled in below (needs the unpickler class)
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": _builtin_container(set),
    "builtins.frozenset": _builtin_container(frozenset),
    "_codecs.encode": _codecs_encode,
    "numpy.dtype": _np_dtype,
    "numpy.ndarray": np.ndarray,  # only as the argument of _reconstruct (calling it is refused)
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "numpy.core.numeric._frombuffer": _np_frombuffer,  # protocol-5 ndarrays (numpy 1.x / 2.x names)
    "numpy._core.numeric._frombuffer": _np_frombuffer,
    **{f"torch.{k}": v for k, v in _TORCH_DTYPES.items()},
    **_TORCH_CONTAINERS,
}

# Types whose instances may receive a BUILD (setstate) opcode.
_BUILD_TYPES = (TorchModuleRecord, EasyDict, np.dtype, np.ndarray)


# ----------------------------------------------------------------------------------------------------------
# The restricted unpickler (pure-Python pickle machinery, so every opcode that calls something is ours).


class _StorageType:
    """What ``torch.FloatStorage`` etc. resolve to inside a nested storage blob: just a dtype."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


_STORAGE_TYPES = {
    f"torch.{name}": _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
        "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
        "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
    }.items()
}


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"refused {what}: not on the allow-list of repro.storage.unpickle; nothing from the pickle was executed "
        f"(the load stopped before it could be called)")


class _RestrictedUnpickler(pickle._Unpickler):  # pure-Python unpickler: its opcode table can be guarded
    """Unpickler whose globals, calls, BUILDs and persistent ids are limited to explicit allow-lists."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed: dict[str, Any], persistent: Optional[Callable[[Any], Any]] = None):
        super().__init__(file, fix_imports=True, encoding="ASCII", errors="strict")
        self._allowed = allowed
        self._callables = {id(v) for v in allowed.values() if callable(v) and v is not np.ndarray}
        self._persistent = persistent

    # --- globals --------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python-2 names written by protocol 0-2 pickles (as pickle itself maps them)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key not in self._allowed or self._allowed[key] is None:
            raise _refuse(f"global {key}")
        return self._allowed[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _refuse(f"persistent id {pid!r:.80}")
        return self._persistent(pid)

    # --- opcodes that call or mutate objects ---------------------------------------------------------
    def _check_callable(self, func: Any, opname: str) -> None:
        if id(func) not in self._callables:
            raise _refuse(f"{opname} on {type(func).__name__} {func!r:.80}")

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_callable(func, "call (REDUCE)")
        if not isinstance(args, tuple):
            raise UnsafePickleError("REDUCE: arguments are not a tuple")
        self.stack[-1] = func(*args)

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls, "object creation (NEWOBJ)")
        if not isinstance(cls, type) or args:
            raise _refuse(f"object creation (NEWOBJ) of {cls!r:.80} with arguments")
        self.append(cls.__new__(cls))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_callable(cls, "object creation (NEWOBJ_EX)")
        if not isinstance(cls, type) or args or kwargs:
            raise _refuse(f"object creation (NEWOBJ_EX) of {cls!r:.80} with arguments")
        self.append(cls.__new__(cls))

    def _load_inst_or_obj(self):
        raise _refuse("INST/OBJ opcode (protocol-0/1 object construction)")

    def _load_build(self):
        state = self.stack[-1]
        inst = self.stack[-2]
        if not isinstance(inst, _BUILD_TYPES):
            raise _refuse(f"BUILD (setstate) on {type(inst).__module__}.{type(inst).__qualname__}")
        if isinstance(inst, EasyDict):
            self.stack.pop()
            if state is None:
                return
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
                if slots:
                    raise _refuse("BUILD with slot state on EasyDict")
            if state:
                raise _refuse("BUILD with instance attributes on EasyDict")
            return
        pickle._Unpickler.load_build(self)

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.INST[0]] = _load_inst_or_obj
    dispatch[pickle.OBJ[0]] = _load_inst_or_obj
    dispatch[pickle.BUILD[0]] = _load_build


# ----------------------------------------------------------------------------------------------------------
# Nested storages: each tensor's storage is a legacy (non-zip) torch.save blob.


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_INNER_ALLOWED: dict[str, Any] = {**_STORAGE_TYPES, "collections.OrderedDict": collections.OrderedDict}


class _PendingStorage:
    __slots__ = ("key", "dtype", "numel", "view")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, view: Any):
        self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


def _parse_legacy_storage_blob(blob: Any) -> _Storage:
    """Parse ``torch.save(storage, f, _use_new_zipfile_serialization=False)`` bytes without torch.load.

    Layout: pickle(magic), pickle(1001), pickle(sys_info), pickle(root with persistent ids
    ('storage', storage_type, key, location, numel, view_metadata)), pickle(sorted keys), then per key an
    int64 element count followed by the raw little-endian bytes.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError(f"_load_from_bytes: argument is a {type(blob).__name__}, not bytes")
    f = io.BytesIO(blob)

    def plain_load() -> Any:
        return _RestrictedUnpickler(f, {}).load()

    if plain_load() != _LEGACY_MAGIC:
        raise ValueError("nested tensor storage: not a legacy torch.save blob (bad magic number)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise ValueError("nested tensor storage: unsupported legacy protocol version")
    sys_info = plain_load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError("nested tensor storage: only little-endian blobs are supported")

    pending: dict[str, _PendingStorage] = {}

    def persistent(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _refuse(f"persistent id {pid!r:.80} in a storage blob")
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise _refuse(f"persistent id {pid!r:.80} in a storage blob")
        if key not in pending:
            pending[key] = _PendingStorage(key, stype.dtype, numel, None)
        if view is not None:
            return _PendingStorage(key, stype.dtype, numel, view)
        return pending[key]

    root = _RestrictedUnpickler(f, _INNER_ALLOWED, persistent).load()
    keys = plain_load()
    if not isinstance(keys, list) or sorted(keys) != sorted(pending):
        raise ValueError("nested tensor storage: storage key list does not match the persistent ids")
    data: dict[str, torch.Tensor] = {}
    for key in keys:
        p = pending[key]
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("nested tensor storage: truncated")
        (numel,) = struct.unpack("<q", head)
        if numel != p.numel:
            raise ValueError(f"nested tensor storage: {numel} elements stored, {p.numel} announced")
        nbytes = numel * torch.empty((), dtype=p.dtype).element_size()
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError("nested tensor storage: truncated data")
        data[key] = torch.frombuffer(bytearray(raw), dtype=p.dtype) if numel else torch.empty(0, dtype=p.dtype)
    if not isinstance(root, _PendingStorage):
        raise UnsafePickleError(f"_load_from_bytes: blob holds a {type(root).__name__}, not a storage")
    flat = data[root.key]
    if root.view is not None:  # very old storage views: (view_key, offset, view_size)
        _vkey, off, n = root.view
        flat = flat[int(off): int(off) + int(n)]
    return _Storage(flat)


ALLOWED_GLOBALS["torch.storage._load_from_bytes"] = _parse_legacy_storage_blob


# ----------------------------------------------------------------------------------------------------------
# Public API.


def loads_edm_pickle(data: bytes) -> Any:
    """Unpickle bytes with the restricted unpickler (no sha check); see :func:`read_edm_pickle`."""
    return _RestrictedUnpickler(io.BytesIO(data), ALLOWED_GLOBALS).load()


def read_edm_pickle(path: Path | str, expected_sha256: Optional[str] = None) -> Any:
    """Read an EDM/EDM2 persistence pickle as data: {'ema': PersistentRecord, ...} (EDM2: an EasyDict).

    With ``expected_sha256`` the file's digest is checked first and a mismatch raises ``ValueError``
    before a single byte is unpickled.
    """
    from repro.storage.files import sha256_file

    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.strip().lower():
            raise ValueError(f"{path}: sha256 mismatch: expected {expected_sha256}, got {actual}; not unpickled")
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, ALLOWED_GLOBALS).load()


def state_dict_from_record(record: Any) -> dict[str, torch.Tensor]:
    """Flatten a record tree of ``torch.nn.Module`` states into ``{name: tensor}`` like ``state_dict()``.

    Order and names follow torch: a module's ``_parameters``, then its persistent ``_buffers`` (names in
    ``_non_persistent_buffers_set`` are skipped), then each entry of ``_modules`` with ``name.`` prefixed;
    ``None`` entries are skipped.
    """
    out: dict[str, torch.Tensor] = {}

    def walk(rec: Any, prefix: str) -> None:
        if not isinstance(rec, Record) or not rec.is_module:
            raise ValueError(f"{prefix or '<root>'}: not a torch.nn.Module record ({type(rec).__name__})")
        st = rec.state
        skip = st.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, t in (st.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{prefix}{name}: {group[1:-1]} is a {type(t).__name__}, not a tensor")
                out[prefix + name] = t.detach()
        for name, sub in (st.get("_modules") or {}).items():
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(record, "")
    return out


