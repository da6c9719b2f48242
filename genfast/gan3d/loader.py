"""Read official EG3D network pickles without running their code, and save/load converted generators.

EG3D's ``.pkl`` files are ``pickle.dump`` of ``{'G', 'D', 'G_ema', 'training_set_kwargs', 'augment_pipe'}``.
Its networks are "persistent" classes: each reduces to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version, module_src, class_name, state}``, where ``module_src`` is Python source
that ``pickle.load`` would ``exec`` and ``state`` is the module's ``__dict__``. Plain ``pickle.load`` of
such a file is arbitrary code execution.

`load_eg3d` instead unpickles with `_EG3DUnpickler`, whose ``find_class`` resolves only:

* torch's tensor rebuild helpers as emitted by ``pickle.dump`` of a tensor (``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_parameter``, ``torch.storage._load_from_bytes`` - whose embedded bytes are read
  with ``torch.load(weights_only=True)``, never with a full unpickler) and ``collections.OrderedDict``;
* numpy's scalar/array/dtype rebuild helpers (EG3D keeps gains such as ``np.sqrt(2)`` in module state);
* ``builtins.set``/``frozenset`` and a guarded ``copyreg._reconstructor``;
* inert stubs for ``_reconstruct_persistent_obj``, ``training.*``, ``torch_utils.*``, ``dnnlib.*`` and
  ``torch.nn.modules.*`` classes: they only record the state they are given.

Any other global (``os.system``, ``builtins.eval`` ...) raises `UnsafePickleError`. The generator is then
rebuilt from ``G_ema``'s ``_init_kwargs`` with genfast's own modules and filled from the flat state dict,
with strict key and shape checks.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import pickle
import warnings
from pathlib import Path

import torch

from ..io import atomic_dir
from .generator import TriPlaneConfig, TriPlaneGenerator

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "UnsafePickleError",
    "convert_eg3d",
    "load_converted",
    "load_eg3d",
    "load_generator",
    "read_eg3d_pickle",
    "save_converted",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# EG3D's TriPlaneGenerator.__init__ positional order, to name any positional _init_args.
_POSITIONAL = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "sr_num_fp16_res",
    "mapping_kwargs",
    "rendering_kwargs",
    "sr_kwargs",
)


class UnsafePickleError(ValueError):
    """The pickle references a global outside the allowlist (or carries unsafe embedded data)."""


class CheckpointError(ValueError):
    """The file is a pickle, but not an EG3D generator genfast can rebuild."""


# -------------------------------------------------------------------------------------------------
# inert stand-ins for EG3D's classes


class PersistentObject:
    """What a persistent EG3D object unpickles to here: its class name, its state, and its (unexecuted) source."""

    def __init__(self, class_name: str, state: dict, module_src: str | None, version):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src
        self.version = version

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r})"


class ReferencedObject:
    """Instance of a class pickled by reference (``training.triplane.OSGDecoder``, ``torch.nn.Softplus`` ...)."""

    stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = (args, kwargs)
        return obj

    def __init__(self, *args, **kwargs):  # called only if the pickle "calls" the class; record, do nothing
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    @property
    def class_name(self) -> str:
        return self.stub_name

    def __repr__(self) -> str:
        return f"ReferencedObject({self.stub_name!r})"


class EasyDictStub(dict):
    """``dnnlib.util.EasyDict`` is a dict with attribute access; a plain dict subclass is all we need."""


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualified_name: str) -> type:
    if qualified_name not in _STUB_CLASSES:
        short = qualified_name.rsplit(".", 1)[-1]
        _STUB_CLASSES[qualified_name] = type(short, (ReferencedObject,), {"stub_name": qualified_name})
    return _STUB_CLASSES[qualified_name]


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise CheckpointError("malformed persistent object: expected meta {type: 'class', class_name, state}")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent object {meta['class_name']} has no state dict")
    return PersistentObject(meta["class_name"], state, meta.get("module_src"), meta.get("version"))


# -------------------------------------------------------------------------------------------------
# guarded versions of the allowed reconstruction helpers


def _load_storage_bytes(data):
    """``torch.storage._load_from_bytes`` runs a full unpickler; read the same bytes with weights_only=True."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("torch.storage._load_from_bytes called with non-bytes data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        try:
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"a tensor storage embedded in the pickle is not plain tensor data: {e}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"embedded tensor data decoded to {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 called without a tensor storage")
    if backward_hooks:
        raise UnsafePickleError("tensor carries backward hooks (code); refusing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor_v2(
            storage, storage_offset, size, stride, requires_grad, collections.OrderedDict(), metadata
        )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("torch._utils._rebuild_parameter called without a tensor")
    if backward_hooks:
        raise UnsafePickleError("parameter carries backward hooks (code); refusing")
    return torch.nn.Parameter(data, requires_grad)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 objects), limited to our stub classes."""
    if isinstance(cls, type) and issubclass(cls, ReferencedObject) and base is object:
        return cls.__new__(cls)
    if cls is EasyDictStub and base is dict:
        return EasyDictStub(state or {})
    raise UnsafePickleError(f"copyreg._reconstructor({getattr(cls, '__name__', cls)}, {base}) is not allowed")


@functools.cache
def _numpy_globals() -> dict[str, object]:
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} is not allowed")
        return multiarray._reconstruct(subtype, shape, dtype)

    out = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}.scalar"] = multiarray.scalar
        out[f"{mod}._reconstruct"] = reconstruct
    return out


def _codecs_encode(text, encoding="latin1"):
    """Protocol-2 pickles store bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is allowed only for latin1 byte strings")
    return text.encode("latin1")


_ALLOWED: dict[str, object] = {
    # What `pickle.dump` of tensors and parameters emits with torch 2.x (and 1.x).
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch.storage._load_from_bytes": _load_storage_bytes,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "copyreg._reconstructor": _reconstructor,
    "_codecs.encode": _codecs_encode,
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "dnnlib.util.EasyDict": EasyDictStub,
    "dnnlib.EasyDict": EasyDictStub,
}

# Classes pickled by reference inside EG3D checkpoints: replaced by inert stubs.
_STUB_PREFIXES = ("training.", "torch_utils.", "dnnlib.", "torch.nn.modules.")


class _EG3DUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if module.startswith("numpy"):
            numpy_globals = _numpy_globals()
            if qualified in numpy_globals:
                return numpy_globals[qualified]
        if qualified.startswith(_STUB_PREFIXES):
            if name.startswith("_"):
                # Private helpers (functions) never appear as pickled classes in EG3D checkpoints.
                raise UnsafePickleError(f"refusing to load global {qualified!r} from an EG3D pickle")
            return _stub_class(qualified)  # never the real class: the stub only records state
        raise UnsafePickleError(
            f"refusing to load global {qualified!r}: EG3D checkpoints only reference tensors, numpy scalars "
            "and EG3D/torch module classes, so this pickle may carry code"
        )

    def persistent_load(self, pid):
        raise CheckpointError(
            "the pickle uses persistent ids (a torch.save file?); expected an EG3D network pickle written by "
            "pickle.dump, e.g. ffhq512-128.pkl"
        )


# What pickle.load raises on bytes that are not a (complete) pickle.
_NOT_A_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    UnicodeDecodeError,
    OverflowError,
    ImportError,
    RecursionError,
)


def read_eg3d_pickle(path: str | Path) -> dict:
    """Unpickle an EG3D ``.pkl`` safely: networks come back as `PersistentObject` trees, tensors as tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"EG3D checkpoint {path} does not exist; download e.g. ffhq512-128.pkl from NVIDIA NGC "
            "(nvidia/research/eg3d) and pass its path"
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected an EG3D .pkl file")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(
                f"{path} is a zip archive (torch.save format?), not an EG3D network pickle written by pickle.dump"
            )
        try:
            data = _EG3DUnpickler(f).load()
        except (UnsafePickleError, CheckpointError):
            raise
        except _NOT_A_PICKLE as e:
            raise CheckpointError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None
    return data


# -------------------------------------------------------------------------------------------------
# from the unpickled tree to a genfast generator


def _state_of(obj) -> dict:
    if isinstance(obj, PersistentObject):
        return obj.state
    if isinstance(obj, ReferencedObject):
        state = obj.__dict__.get("state")
        return state if isinstance(state, dict) else {}
    raise CheckpointError(f"expected a network module in the checkpoint, found {type(obj).__name__}")


def _class_name(obj) -> str:
    return getattr(obj, "class_name", type(obj).__name__)


def flat_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of an unpickled module tree: parameters and persistent buffers, dotted names."""
    state = _state_of(obj)
    out: dict[str, torch.Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} in {group} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flat_state_dict(child, prefix + name + "."))
    return out


def _init_kwargs_of(g_ema: PersistentObject) -> dict:
    state = g_ema.state
    args = tuple(state.get("_init_args") or ())
    kwargs = dict(state.get("_init_kwargs") or {})
    if len(args) > len(_POSITIONAL):
        raise CheckpointError(f"G_ema has {len(args)} positional init args; TriPlaneGenerator takes {len(_POSITIONAL)}")
    for name, value in zip(_POSITIONAL, args, strict=False):
        if name in kwargs:
            raise CheckpointError(f"G_ema init argument {name!r} given both positionally and by keyword")
        kwargs[name] = value
    if "rendering_kwargs" in state and isinstance(state["rendering_kwargs"], dict):
        kwargs["rendering_kwargs"] = state["rendering_kwargs"]  # the live settings EG3D renders with
    nrr = state.get("neural_rendering_resolution")
    if nrr is not None:
        kwargs["neural_rendering_resolution"] = int(nrr)
    return kwargs


def load_state_strict(G: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with errors that list a few offending keys and shapes."""
    expected = G.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"{source}: tensors do not match the generator its config describes: " + "; ".join(parts))
    bad = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensors have the wrong shape (checkpoint vs model), e.g. {bad[:3]}"
        )
    G.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)


def generator_from_pickle_data(data, source: str = "checkpoint", key: str = "G_ema") -> TriPlaneGenerator:
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} holds a {type(data).__name__}; an EG3D pickle holds a dict with {key!r}")
    if key not in data:
        raise CheckpointError(f"{source} has no {key!r} network (keys: {sorted(map(str, data))})")
    g_ema = data[key]
    if not isinstance(g_ema, PersistentObject) or not g_ema.class_name.endswith("TriPlaneGenerator"):
        raise CheckpointError(
            f"{source}[{key!r}] is {_class_name(g_ema)!r}, expected EG3D's training.triplane.TriPlaneGenerator"
        )
    kwargs = _init_kwargs_of(g_ema)
    try:
        config = TriPlaneConfig.from_dict(kwargs)
        G = TriPlaneGenerator(**config.init_kwargs())
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build a generator from G_ema's init kwargs: {e}") from None
    load_state_strict(G, flat_state_dict(g_ema), source)
    return G.eval()


def load_eg3d(path: str | Path, key: str = "G_ema") -> TriPlaneGenerator:
    """Load an official EG3D network pickle (e.g. ``ffhq512-128.pkl``) into a genfast `TriPlaneGenerator`.

    The embedded source code is never executed; see the module docstring. Raises FileNotFoundError,
    `UnsafePickleError` (a global outside the allowlist) or ValueError (not an EG3D pickle, missing
    ``G_ema``, unsupported settings, mismatched tensors).
    """
    data = read_eg3d_pickle(path)
    return generator_from_pickle_data(data, source=str(path), key=key)


# -------------------------------------------------------------------------------------------------
# converted format: model.safetensors + config.json


def save_converted(G: TriPlaneGenerator, out_dir: str | Path) -> Path:
    """Write ``out_dir/{model.safetensors, config.json}`` atomically (the folder appears complete or not at all)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in G.state_dict().items()}
    config = G.config()
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "genfast": "eg3d-triplane"})
        (tmp / WEIGHTS_NAME).chmod(0o644)  # safetensors writes owner-only files
        (tmp / CONFIG_NAME).write_text(config.to_json() + "\n")
    return out_dir


def load_converted(path: str | Path) -> TriPlaneGenerator:
    """Load a folder written by `save_converted` / `convert_eg3d`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"converted generator folder {path} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing; convert a checkpoint with `genfast convert-eg3d PKL OUT`"
            )
    try:
        config = TriPlaneConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from None
    G = TriPlaneGenerator(**config.init_kwargs())
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    load_state_strict(G, tensors, str(path / WEIGHTS_NAME))
    return G.eval()


def convert_eg3d(pkl: str | Path, out_dir: str | Path) -> Path:
    """Official EG3D ``.pkl`` -> ``out_dir`` with ``model.safetensors`` + ``config.json``."""
    G = load_eg3d(pkl)
    return save_converted(G, out_dir)


def load_generator(path: str | Path) -> TriPlaneGenerator:
    """A converted folder or an EG3D ``.pkl``, whichever ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"generator checkpoint {path} does not exist (expected an EG3D .pkl or a folder)")
    if path.is_dir():
        return load_converted(path)
    return load_eg3d(path)
