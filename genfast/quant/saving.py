"""Quantized pipelines on disk: `save_quantized` writes a diffusers pipeline folder, `load_pipeline` reads it.

The folder is what `pipe.save_pretrained` writes, except in each quantized model's folder (the
denoiser's, `unet/` or `transformer/`): there `config.json` (the diffusers model config) sits beside

* `genfast_quantized.safetensors`: the model's float tensors (norms, biases, skipped layers) under
  their state-dict names, and per quantized layer its packed tensors, `<layer>.weight.codes`
  (2/3/4/6-bit codes bit-packed), `<layer>.weight.scale`, and `.zero` / `.tensor_scale` where the
  format has them;
* `genfast_quantization.json`: the QuantConfig (format, granularity, symmetric, skip), per layer
  its weight shape and dtype and each stored field's shape and dtype, the genfast version, and the
  sha256 of the safetensors file.

Reading it back runs no code (safetensors + JSON): the model is built from its config with empty
weights (accelerate), each quantized layer gets its `PackedWeight` parametrization holding the
stored tensors, and the float tensors are put in place; no float weight of a quantized layer is
ever materialised. A folder that is truncated, whose JSON does not match its tensors, or that names
a format this genfast does not know is refused, naming the file and what to do.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from ..api import handles_on
from ..io import atomic_dir, check_output
from .config import QuantConfig
from .layers import PackedWeight, is_quantized, quantize_layer, stored
from .pack import packed_nbytes
from .quantize import LAYER_TYPES, QuantizeHandle

FORMAT = "genfast-quantized/1"
CONFIG_NAME = "genfast_quantization.json"
WEIGHTS_NAME = "genfast_quantized.safetensors"
_CONFIG_KEYS = ("weights", "granularity", "symmetric", "skip")  # what a saved QuantConfig keeps


class QuantizedFolderError(ValueError):
    """A quantized pipeline folder that cannot be read back as written."""


# ---------------------------------------------------------------- saving


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder in which some model folder holds genfast's quantization config."""
    path = Path(path)
    return (path / "model_index.json").is_file() and any(path.glob(f"*/{CONFIG_NAME}"))


def check_out(out_dir: str | os.PathLike, what: str = "out_dir") -> Path:
    """`io.check_output` for a quantized pipeline folder, which a save replaces whole: an existing folder
    must be empty or a genfast quantized pipeline folder."""
    out = check_output(out_dir, folder=True, what=what)
    if out.is_dir() and any(out.iterdir()) and not is_quantized_folder(out):
        raise ValueError(f"{what} {out} is a folder with files in it and not a genfast quantized pipeline; a save "
                         f"replaces its output folder whole, so give a new folder name")
    return out


def _quantized_models(pipe, handle: QuantizeHandle | None) -> list[tuple[str, torch.nn.Module, QuantizeHandle, dict]]:
    """(component name, model, its quantize handle, {layer name: quantized layer}) per quantized component."""
    from diffusers import DiffusionPipeline, ModelMixin

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"save_quantized writes a diffusers pipeline folder: pass the pipeline (got "
                        f"{type(pipe).__name__}), quantized with genfast.quantize(pipe, ...)")
    found = []
    for attr, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        layers = {name: m for name, m in component.named_modules() if is_quantized(m)}
        if not layers:
            continue
        owners = {id(h): h for h in (handles_on(m).get("quantize") for m in layers.values()) if h is not None}
        if any("quantize" not in handles_on(m) for m in layers.values()):
            raise ValueError(f"pipe.{attr} holds packed layers that no genfast.quantize handle owns; quantize it "
                             f"with genfast.quantize")
        if len(owners) != 1:
            raise ValueError(f"pipe.{attr} holds packed layers of {len(owners)} genfast.quantize calls; "
                             f"save_quantized saves a model quantized by one call")
        owner = next(iter(owners.values()))
        from .kernels import on_torchao

        if any(on_torchao(m) for m in owner.layers.values()):
            raise ValueError(f"pipe.{attr} runs some layers on torchao's kernels (kernel={owner.config.kernel!r}), whose "
                             f"tensors are not genfast's packed codes: quantize with kernel='dequantize' to save")
        if not isinstance(component, ModelMixin):
            raise TypeError(f"pipe.{attr} ({type(component).__name__}) is quantized, but save_quantized writes "
                             f"diffusers models (ModelMixin) only: quantize the denoiser")
        if getattr(component, "peft_config", None) or any(".base_layer." in f".{n}." for n in layers):
            raise ValueError(f"pipe.{attr} carries a peft / LoRA adapter: fuse it into the quantized weights "
                             f"(genfast.quant.lora.fuse_lora(pipe), which quantizes W + delta again) or save it with "
                             f"pipe.save_lora_weights and load it onto the reloaded pipeline")
        if owner.config.activations is not None:
            raise ValueError("save_quantized stores quantized weights; simulated activation quantization "
                             f"(activations={owner.config.activations!r}) is calibrated in memory and would be "
                             "lost: quantize with activations=None to save")
        found.append((attr, component, owner, layers))
    if handle is not None:
        if not isinstance(handle, QuantizeHandle):
            raise TypeError(f"handle must be a genfast.quantize handle, got {type(handle).__name__}")
        if handle.removed:
            raise ValueError(f"the handle given was removed: there is nothing quantized to save ({handle!r})")
        if not any(h is handle for _, _, h, _ in found):
            raise ValueError("the handle given quantized no component of this pipeline; pass the pipeline it was "
                             "applied to")
    if not found:
        raise ValueError(f"this {type(pipe).__name__} is not quantized: call genfast.quantize(pipe, "
                         f"genfast.QuantConfig(...)) first, then save_quantized(pipe, out_dir)")
    return found


def _saved_config(config: QuantConfig) -> dict:
    return {"weights": config.weights, "granularity": config.granularity, "symmetric": config.symmetric,
            "skip": list(config.skip)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_model(folder: Path, model: torch.nn.Module, config: QuantConfig, layers: dict) -> None:
    from safetensors.torch import save_file

    from .. import __version__
    from ..training.checkpoint import sha256_file

    tensors: dict[str, torch.Tensor] = {}
    packed_keys: set[str] = set()  # the parametrization's state-dict names, replaced by <layer>.weight.<field>
    entries = {}
    for name, layer in layers.items():
        param = layer.parametrizations["weight"][0]
        parts = stored(layer)
        entries[name] = {"shape": list(param.shape), "dtype": _dtype_name(param.dtype),
                         "fields": {f: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for f, t in parts.items()}}
        for i, (field, t) in enumerate(parts.items()):
            tensors[f"{name}.weight.{field}"] = t
            packed_keys.add(f"{name}.parametrizations.weight.original{i}")
    for key, t in model.state_dict().items():
        if key in packed_keys:
            continue
        if key in tensors:
            raise ValueError(f"{type(model).__name__} has a tensor named {key!r}, which the packed layout uses")
        tensors[key] = t
    weights = folder / WEIGHTS_NAME
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(weights),
              metadata={"format": "pt", "genfast": FORMAT})
    meta = {"format": FORMAT, "genfast_version": __version__, "config": _saved_config(config),
            "weights_file": WEIGHTS_NAME, "sha256": sha256_file(weights), "layers": entries}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")


def save_quantized(pipe, out_dir: str | os.PathLike, handle: QuantizeHandle | None = None) -> Path:
    """Write a genfast-quantized pipeline as a diffusers pipeline folder, in one atomic rename.

    >>> genfast.quantize(pipe, genfast.QuantConfig(weights="int4", granularity="group:64"))
    >>> genfast.save_quantized(pipe, "mini-int4")
    >>> pipe = genfast.load_pipeline("mini-int4")

    `out_dir` must be new, empty, or a quantized folder written before (it is replaced). `handle`:
    the genfast.quantize handle, checked to belong to `pipe` (found on the pipeline when left out).
    """
    out = check_out(out_dir)
    models = _quantized_models(pipe, handle)
    with atomic_dir(out) as tmp:
        # every component the diffusers way; each quantized model's own weight files are then replaced
        pipe.save_pretrained(tmp)
        for attr, model, owner, layers in models:
            folder = tmp / attr
            for old in folder.glob("diffusion_pytorch_model*"):
                old.unlink()
            _write_model(folder, model, owner.config, layers)
    return out


# ---------------------------------------------------------------- loading


def _refuse(path: Path, problem: str, fix: str = "save the pipeline again (genfast.save_quantized or "
                                                  "`genfast quantize`)"):
    raise QuantizedFolderError(f"{path}: {problem}; {fix}")


def _read_meta(folder: Path) -> tuple[dict, QuantConfig]:
    path = folder / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _refuse(path, f"not a readable JSON file ({err})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        _refuse(path, f"format is {found!r}, this genfast reads {FORMAT!r}",
                "use the genfast version that wrote it, or save the pipeline again with this one")
    for key, kind in (("config", dict), ("layers", dict), ("sha256", str), ("weights_file", str)):
        if not isinstance(meta.get(key), kind):
            _refuse(path, f"{key!r} is missing or not a {kind.__name__}")
    if meta["weights_file"] != WEIGHTS_NAME:
        _refuse(path, f"weights_file is {meta['weights_file']!r}, expected {WEIGHTS_NAME!r}")
    config = dict(meta["config"])
    if set(config) != set(_CONFIG_KEYS):
        _refuse(path, f"config holds {sorted(config)}, expected {sorted(_CONFIG_KEYS)}")
    try:
        qconfig = QuantConfig(**config)
    except (TypeError, ValueError) as err:
        from .formats import FORMATS

        fix = (f"this genfast knows the formats {', '.join(FORMATS)}: use the genfast version that wrote it"
               if config.get("weights") not in FORMATS else "save the pipeline again")
        _refuse(path, f"its quantization config is refused: {err}", fix)
    if not meta["layers"]:
        _refuse(path, "lists no quantized layer")
    return meta, qconfig


def _read_tensors(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..training.checkpoint import sha256_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        _refuse(path, f"missing (the quantized weights that {CONFIG_NAME} describes)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        _refuse(path, f"not a complete safetensors file ({err}): it is truncated or damaged")
    if sha256_file(path) != meta["sha256"]:
        _refuse(path, f"its sha256 does not match the one in {CONFIG_NAME}: the file changed after it was saved")
    return tensors


def _expected_counts(param: PackedWeight) -> dict[str, int]:
    """Elements each stored field must have: one code per padded weight element (bit-packed), one scale
    (and zero) per channel / group / block / tensor. Checked at load so a config that does not match its
    tensors fails here, not inside a forward."""
    from .formats import parse_granularity

    fmt, n = param.fmt, param.rows * param.width
    if fmt.block is not None:
        scales = n // fmt.block
    else:
        g = parse_granularity(param.granularity)
        scales = param.rows if g is None else 1 if g == 0 else n // g
    return {"codes": packed_nbytes(n, fmt.bits), "scale": scales, "zero": scales, "tensor_scale": 1}


def _model_class(entry, path: Path):
    from diffusers import ModelMixin

    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        _refuse(path, f"model_index.json gives no [library, class] for it ({entry!r})")
    library, name = entry
    try:
        cls = getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        _refuse(path, f"model_index.json names {library}.{name}, which cannot be imported",
                f"install the library that provides {name}")
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        _refuse(path, f"{library}.{name} is not a diffusers model (ModelMixin)")
    return cls


def _layer_parts(name: str, spec, param: PackedWeight, tensors: dict, path: Path) -> tuple[torch.Tensor, ...]:
    """The stored tensors of one layer, checked against its JSON entry and its format."""
    if not isinstance(spec, dict) or not isinstance(spec.get("fields"), dict):
        _refuse(path, f"layer {name!r} has no 'fields' entry")
    if list(spec["fields"]) != list(param.fields):
        _refuse(path, f"layer {name!r} lists fields {list(spec['fields'])}, but {param.fmt.name} "
                      f"{'symmetric' if param.symmetric else 'asymmetric'} stores {list(param.fields)}")
    counts = _expected_counts(param)
    parts = []
    for field in param.fields:
        key, want = f"{name}.weight.{field}", spec["fields"][field]
        t = tensors.get(key)
        if t is None:
            _refuse(path, f"layer {name!r}: tensor {key!r} is not in {WEIGHTS_NAME}")
        if not isinstance(want, dict) or list(t.shape) != want.get("shape") or _dtype_name(t.dtype) != want.get("dtype"):
            _refuse(path, f"layer {name!r}: {key} is {_dtype_name(t.dtype)} {list(t.shape)} in {WEIGHTS_NAME}, "
                          f"the JSON says {want!r}")
        if t.numel() != counts[field]:
            _refuse(path, f"layer {name!r}: {key} holds {t.numel()} elements, a {list(param.shape)} weight in "
                          f"{param.fmt.name} ({param.granularity}) needs {counts[field]}")
        parts.append(t)
    return tuple(parts)


def _float_dtype(text, path: Path, name: str) -> torch.dtype:
    dtype = getattr(torch, str(text), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        _refuse(path, f"layer {name!r} has dtype {text!r}, not a float dtype")
    return dtype


def saved_dtype(folder: str | os.PathLike) -> torch.dtype:
    """The dtype a quantized model folder's weights decode to (that of the model it was saved from)."""
    path = Path(folder) / CONFIG_NAME
    meta, _ = _read_meta(Path(folder))
    dtypes = {_float_dtype(spec.get("dtype") if isinstance(spec, dict) else None, path, name)
              for name, spec in meta["layers"].items()}
    if len(dtypes) != 1:
        _refuse(path, f"its layers decode to several dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def load_quantized_model(folder: str | os.PathLike, entry, dtype: torch.dtype | None = None):
    """(model, QuantConfig, {layer: quantized layer}) from one quantized model folder; `entry` is its
    model_index.json [library, class]. dtype None keeps the saved dtype (outputs equal the in-memory
    quantized model's bit for bit); another dtype decodes to it and casts the float tensors."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    cls = _model_class(entry, folder)
    meta, qconfig = _read_meta(folder)
    path = folder / CONFIG_NAME
    tensors = _read_tensors(folder, meta)
    with init_empty_weights():  # parameters on the meta device: no float weight is allocated
        model = cls.from_config(cls.load_config(folder))
    layers, installed = {}, set()
    for name, spec in meta["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            _refuse(path, f"layer {name!r} is not in the {cls.__name__} its config.json builds")
        if not isinstance(layer, LAYER_TYPES):
            _refuse(path, f"layer {name!r} is a {type(layer).__name__}, not a Linear or Conv2d")
        if not isinstance(spec, dict) or list(layer.weight.shape) != spec.get("shape"):
            shape = spec.get("shape") if isinstance(spec, dict) else None
            _refuse(path, f"layer {name!r} has weight shape {shape} in the JSON, {list(layer.weight.shape)} in "
                          f"the model config.json builds")
        param = PackedWeight(qconfig.format, qconfig.granularity, qconfig.symmetric, layer.weight.shape,
                             dtype or _float_dtype(spec.get("dtype"), path, name))
        parts = _layer_parts(name, spec, param, tensors, path)
        # an empty weight of the dtype to decode to: the codes come from the file, not from encoding
        layer.weight = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                          requires_grad=False)
        quantize_layer(layer, qconfig.format, qconfig.granularity, qconfig.symmetric, stored=parts)
        layers[name] = layer
        installed |= {f"{name}.weight.{f}" for f in param.fields}
        installed |= {f"{name}.parametrizations.weight.original{i}" for i in range(len(param.fields))}
    orphans = sorted(k.removesuffix(".weight.codes") for k in tensors if k.endswith(".weight.codes") and k not in installed)
    if orphans:
        _refuse(path, f"layer {orphans[0]!r} has packed tensors in {WEIGHTS_NAME} but no entry in the JSON "
                      f"({len(orphans)} such layer(s))")
    keep32 = getattr(cls, "_keep_in_fp32_modules", None) or []
    rest = {}
    for key, t in tensors.items():
        if key in installed:
            continue
        if dtype is not None and t.is_floating_point() and not any(m in key.split(".") for m in keep32):
            t = t.to(dtype)
        rest[key] = t
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in installed]
    if result.unexpected_keys or missing:
        what = f"holds tensors the model has no place for: {result.unexpected_keys[:5]}" if result.unexpected_keys \
            else f"lacks tensors of the model: {missing[:5]}"
        _refuse(folder / WEIGHTS_NAME, f"{what} (config.json and the weights do not belong together)")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        _refuse(folder / WEIGHTS_NAME, f"leaves tensors of the model empty: {empty[:5]}")
    return model.eval(), qconfig, layers


class LoadedQuantizeHandle(QuantizeHandle):
    """The quantize handle of a model read from a quantized folder, recorded on it like any other, so
    quantizing it again is refused and save_quantized can write it again. There are no float weights
    to put back: remove() raises."""

    def __init__(self, target, model, config: QuantConfig, layers: dict, folder: Path):
        def undo():
            raise RuntimeError(f"{type(model).__name__} was loaded from the quantized folder {folder}, which holds "
                               f"packed weights only: there are no float weights to restore; load the float "
                               f"pipeline it was quantized from instead")

        super().__init__(target, model, config, undo, [model, *layers.values()], layers)


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Any local diffusers pipeline folder (or genfast VARPipeline folder), offline; a genfast quantized one
    with its packed models rebuilt.

    dtype None: a quantized folder loads in the dtype it was saved from (an fp16 model stays fp16,
    and outputs equal the quantized pipeline's before saving, bit for bit); other folders load as
    diffusers does by default. The quantized models carry a genfast.quantize handle
    (`genfast.api.handles_on(pipe.unet)["quantize"]`) whose remove() raises: there is nothing to restore.
    """
    from ..models import pipeline_class

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusers pipeline at {path}: expected a folder with model_index.json "
                                f"(one written by save_pretrained or save_quantized)")
    index = json.loads((path / "model_index.json").read_text())
    folders = {name: path / name for name in index if (path / name / CONFIG_NAME).is_file()}
    if folders and dtype is None:
        dtypes = {saved_dtype(f) for f in folders.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if dtype is None:
            raise QuantizedFolderError(f"{path}: its quantized models were saved in different dtypes; "
                                       f"pass dtype= to load them in one")
    loaded = {name: load_quantized_model(folder, index[name], dtype) for name, folder in folders.items()}
    pipe = pipeline_class(path).from_pretrained(path, dtype=dtype, local_files_only=True,
                                                **{name: model for name, (model, _, _) in loaded.items()})
    for name, (model, qconfig, layers) in loaded.items():
        LoadedQuantizeHandle(pipe, model, qconfig, layers, folders[name])
    if hasattr(pipe, "labels"):  # a DiTPipeline: record its class names, or saving it again would drop them
        from ..pipelines.class_conditional import keep_labels

        keep_labels(pipe)
    # everything is on the CPU already; diffusers' to("cpu") would only warn about fp16 on CPU
    return pipe if torch.device(device).type == "cpu" else pipe.to(device)


# ---------------------------------------------------------------- sizes and dtypes on disk

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def weights_dtype(path: str | os.PathLike) -> torch.dtype:
    """The float dtype most of a pipeline folder's safetensors bytes are stored in (read from the headers)."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for file in Path(path).glob("*/*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                part = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is not None:
                    n = 1
                    for s in part.get_shape():
                        n *= s
                    counts[dtype] = counts.get(dtype, 0) + n * dtype.itemsize
    if not counts:
        raise FileNotFoundError(f"{path} holds no float safetensors weights (expected <component>/*.safetensors)")
    return max(counts, key=counts.get)


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files in one folder (a model folder of a pipeline: config, weights, JSON)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
