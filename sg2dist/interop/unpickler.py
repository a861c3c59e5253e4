"""A restricted unpickler for official StyleGAN network pickles: data, never code.

The official pickles (stylegan2-ada-pytorch, stylegan3) store each network as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds the source
code of the network's Python module (`module_src`), the class name and the object's state
(its `__dict__`: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, attributes). The
official loader executes `module_src`. This one resolves only the globals such a pickle
needs, each to a stand-in that builds plain data:

    torch_utils.persistence._reconstruct_persistent_obj -> OfficialObject(class_name, state);
                                                           module_src is never executed
    dnnlib.util.EasyDict, collections.OrderedDict, builtins.set -> plain containers
    numpy scalar and dtype -> numeric numpy values only
    torch._utils._rebuild_tensor_v2, _rebuild_parameter[_with_state] -> tensors, checked
    torch.storage._load_from_bytes -> torch.load(weights_only=True) of the storage bytes

Any other global is refused with one error naming it, before anything is called. Two
opcodes that could reach code without a global are closed too: BUILD (set an object's
state) is allowed only on numpy dtypes, the one place these pickles use it, and the EXT
opcodes (copyreg's extension registry) are refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sg2dist.errors import UserError

NUMERIC_DTYPE_KINDS = "biufc"  # bool, int, uint, float, complex: never object or structured


class ReadableFile(Protocol):
    def read(self, size: int, /) -> bytes: ...

    def readline(self) -> bytes: ...


@dataclass
class OfficialObject:
    """One persistent object of the pickle (a network or layer), as data: the official
    class name and its state; submodules in `state["_modules"]` are OfficialObjects too."""

    class_name: str
    state: dict[str, Any]
    version: int
    module_src_sha256: str = field(repr=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of this object alone (a frozen official layer keeps its
        weights as buffers, so both count)."""
        found: dict[str, torch.Tensor] = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None:
                    found[name] = value
        return found

    def children(self) -> dict[str, OfficialObject]:
        return {
            name: module
            for name, module in (self.state.get("_modules") or {}).items()
            if module is not None
        }


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access in the official code)."""


def _reconstruct_persistent_obj(meta: Any) -> OfficialObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UserError(
            "a persistent object of the pickle has no class meta (type 'class'); "
            "the file is not an official network pickle"
        )
    class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src")
    if not isinstance(class_name, str) or not isinstance(state, dict) or not isinstance(src, str):
        raise UserError(
            "a persistent object of the pickle lacks class_name, state or module_src; "
            "the file is not an official network pickle"
        )
    return OfficialObject(
        class_name=class_name,
        state=dict(state),
        version=int(meta.get("version", 0)),
        module_src_sha256=hashlib.sha256(src.encode("utf-8", "replace")).hexdigest(),
    )


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(name, str):
        raise UserError(f"the pickle builds a numpy dtype from {type(name).__name__}; refused")
    dtype = np.dtype(name)
    if dtype.kind not in NUMERIC_DTYPE_KINDS:
        raise UserError(f"the pickle builds a numpy dtype '{name}' that is not numeric; refused")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_DTYPE_KINDS:
        raise UserError("the pickle builds a numpy scalar that is not numeric; refused")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UserError("the pickle builds a numpy scalar from malformed bytes; refused")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _load_from_bytes(data: Any) -> Any:
    if not isinstance(data, bytes):
        raise UserError("a tensor storage of the pickle is not bytes; refused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise UserError("a tensor storage of the pickle holds something else; refused")
    return storage


def _check_no_hooks(hooks: Any) -> None:
    if hooks:  # hooks are functions: official pickles never hold any
        raise UserError("a tensor of the pickle carries backward hooks; refused")


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    ints_ok = isinstance(storage_offset, int) and all(
        isinstance(v, tuple) and all(isinstance(i, int) for i in v) for v in (size, stride)
    )
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage) or not ints_ok:
        raise UserError("a tensor of the pickle has a malformed storage, size or stride; refused")
    _check_no_hooks(backward_hooks)
    if metadata:
        raise UserError("a tensor of the pickle carries extra metadata; refused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._utils._rebuild_tensor_v2(
            storage, storage_offset, size, stride, False, OrderedDict()
        )


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None):
    if not isinstance(data, torch.Tensor):
        raise UserError("a parameter of the pickle holds no tensor; refused")
    _check_no_hooks(backward_hooks)
    return data  # a plain tensor: only its values are used


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any):
    if state:
        raise UserError("a parameter of the pickle carries extra state; refused")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")

# (module, name) -> the stand-in the pickle gets. Nothing else resolves.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("numpy", "dtype"): _numpy_dtype,
    **{(core, "scalar"): _numpy_scalar for core in _NUMPY_CORE},
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that single opcodes can be closed (see module doc).

    Its speed is no concern here: a network pickle has a few thousand opcodes, and the
    tensor bytes are read in large blocks.
    """

    stack: list[Any]  # the unpickler's value stack (set by the base class)

    def __init__(self, file: ReadableFile, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module.startswith("dnnlib.tflib"):
            raise UserError(
                f"{self.source} is a TensorFlow StyleGAN pickle ({module}.{name}); sg2dist reads "
                "the PyTorch format: convert it with legacy.py of NVlabs/stylegan2-ada-pytorch"
            )
        raise UserError(
            f"{self.source} refers to {module}.{name}, which an official StyleGAN network "
            "pickle never needs; refused without running it (only the network classes, "
            "tensors and plain containers are read)"
        )

    def _load_build(self) -> None:
        if not isinstance(self.stack[-2], np.dtype):
            raise UserError(
                f"{self.source} sets the state of a {type(self.stack[-2]).__name__} object, "
                "which an official network pickle never does; refused"
            )
        _BASE_LOAD_BUILD(self)

    def _refuse_extension(self) -> None:
        raise UserError(
            f"{self.source} uses pickle extension codes, which an official network pickle "
            "never does; refused"
        )


_BASE_LOAD_BUILD = vars(pickle._Unpickler)["load_build"]
_DISPATCH: dict[int, Any] = {
    **pickle._Unpickler.dispatch,
    pickle.BUILD[0]: _RestrictedUnpickler._load_build,
    **{
        op[0]: _RestrictedUnpickler._refuse_extension
        for op in (pickle.EXT1, pickle.EXT2, pickle.EXT4)
    },
}
_RestrictedUnpickler.dispatch = _DISPATCH

# What a truncated or damaged file raises from inside the unpickler.
_DAMAGE_ERRORS = (
    EOFError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    struct.error,
    RuntimeError,
    OverflowError,
    MemoryError,
)


def load_official(file: ReadableFile, source: str) -> Any:
    """The pickle's top-level object with every network as an OfficialObject tree; refuses
    any global outside ALLOWED_GLOBALS (UserError naming it) and reports a truncated or
    damaged file as one UserError."""
    try:
        return _RestrictedUnpickler(file, source).load()
    except UserError:
        raise
    except _DAMAGE_ERRORS as exc:
        reason = (str(exc).splitlines() or [""])[0][:160]
        raise UserError(
            f"{source} is not a complete network pickle ({type(exc).__name__}: {reason}); "
            "the file is truncated or damaged: download it again"
        ) from None
