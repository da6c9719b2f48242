"""My3DGen's low-rank adapters for the EG3D generator: personalise a frozen base with ~0.2M parameters.

Where the adapters go (My3DGen, ``training/networks_stylegan2.py`` wrappers): every modulated convolution
(the 3x3 ``SynthesisLayer`` convs and the 1x1 ``ToRGBLayer`` convs) and the affine "style" layer feeding
it, in the tri-plane synthesis network and in the super-resolution module, all at one rank ``r`` and
scale ``alpha / r``. The mapping network and the ``OSGDecoder`` stay frozen and unadapted.

=============================  =============  ========  ==========================================
layer                          lora_A         lora_B    effective weight
=============================  =============  ========  ==========================================
SynthesisLayer.weight (k=3)    (r*k, I*k*k)   (O, r*k)  W + (B @ A).view(O, I, k, k) * alpha / r
ToRGBLayer.weight (k=1)        (r, I)         (O, r)    same formula with k = 1
affine FullyConnectedLayer     (r, in)        (out, r)  y = base(x) + x @ A^T @ B^T * alpha / r
=============================  =============  ========  ==========================================

The conv update sits in the raw weight space, i.e. *before* modulation and demodulation, so it is
re-normalised by demodulation exactly like the base weight. Its rank is r*k (3 for a 3x3 conv at r=1),
as in My3DGen.

Two conv layouts, both My3DGen's (its module-level switch ``original_conv_lora``):

- ``"my3dgen"`` (its default, False): A (r*k, I*k*k), B (O, r*k) -- the table above; 240K at FFHQ-512, r=1.
- ``"loralib"`` (True, loralib's ``ConvLoRA``): A (r*k, I*k), B (O*k, r*k), ``(B @ A).view(O, I, k, k)``;
  r*k^2*(I + O) instead of r*k*(I*k^2 + O) per conv, ~0.6x at I = O. It matters on narrow generators:
  a my3dgen-layout adapter costs r*k/O + r/(I*k) of a 3x3 conv's weights: 0.65% at FFHQ-512's 512
  channels, 2.6% at the embedded prior's 128.

``A`` starts as ``kaiming_uniform_(a=sqrt(5))`` and ``B`` as zeros, so at step 0 the adapted generator
is the base generator bit for bit (W + 0 == W).

Why ``torch.nn.utils.parametrize`` and not peft: peft's LoRA matches ``nn.Linear`` / ``nn.Conv2d``
modules, while EG3D's layers hold raw ``nn.Parameter`` weights and call the convolution functionally
(``modulated_conv2d``), so peft finds nothing to wrap; its custom-module registration is marked
experimental. A parametrization replaces ``module.weight`` by ``f(original)`` wherever the existing
forward code reads it, so networks.py stays untouched, and ``remove_parametrizations`` either restores
the original tensor or bakes the update in (a merged, adapter-free generator).

Biases (an explicit choice): by default only A and B train ("pure LoRA"); biases, the b4 ``const``
and ``noise_strength`` stay frozen. My3DGen trains more, as a side effect (``requires_grad_(True)`` on
each block, freezing only ``.weight``): the conv/affine biases (16,582 in FFHQ-512), ``const`` (8,192)
and ``noise_strength`` (17). ``train_biases=True`` trains the biases of every adapted layer (the conv
bias and the affine bias: 16,582 at FFHQ-512) -- not ``const`` / ``noise_strength``. They are trained
as zero-initialised additive deltas (``bias = base_bias + bias_delta``, also a parametrization), so the
base tensors are never written to: ``remove_lora(merge=False)`` restores the base exactly and
`base_hash` identifies the base even while adapters are attached.

Adapter files (`save_adapter`): ``adapter.safetensors`` (``<layer>.lora_A``, ``<layer>.lora_B`` and,
with ``train_biases``, ``<layer>.bias_delta``) and ``adapter.json`` (rank, alpha, train_biases, conv
layout, the base generator's hash, genfast version, parameter count). Loading onto another base is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..io import atomic_dir
from .networks import SynthesisLayer, ToRGBLayer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONV_LAYOUTS",
    "BiasDelta",
    "LoraDelta",
    "LoraState",
    "add_lora",
    "base_hash",
    "count_lora_parameters",
    "get_lora_state",
    "load_adapter",
    "load_lora_state_dict",
    "lora_parameter_breakdown",
    "lora_parameters",
    "lora_state_dict",
    "read_adapter_config",
    "remove_lora",
    "save_adapter",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "genfast-eg3d-lora"
FORMAT_VERSION = 1
TARGETS = {"synthesis": "backbone.synthesis", "superresolution": "superresolution"}
CONV_LAYOUTS = ("my3dgen", "loralib")
_STATE_ATTR = "_genfast_lora"
# state-dict keys of parametrized modules: "<m>.parametrizations.<t>.original" holds the base tensor,
# "<m>.parametrizations.<t>.<i>.<name>" the parametrization's own tensors (here: the adapter).
_ORIGINAL_KEY = re.compile(r"\.parametrizations\.(\w+)\.original$")
_PARAMETRIZATION_KEY = re.compile(r"\.parametrizations\.\w+\.\d+\.")


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + multiplier * (B @ A).view(W.shape)``.

    A (r*k, fan_in) and B (out, r*k) in the "my3dgen" layout; A (r*k, I*k) and B (O*k, r*k) in the
    "loralib" one (k = 1 for linear layers and 1x1 convs, where the two coincide).
    ``multiplier`` is ``alpha / rank`` divided by the runtime gain the layer applies to its stored
    weight, if any (see `add_lora`: the affine layers multiply by ``weight_gain``).
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, runtime_gain: float = 1.0,
                 layout: str = "my3dgen"):
        super().__init__()
        kernel = weight.shape[-1] if weight.ndim == 4 else 1  # My3DGen: rank r*k for a k x k conv
        inner = rank * kernel
        if layout == "loralib":
            rows, cols = weight.shape[0] * kernel, weight.shape[1] * kernel
        else:
            rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(inner, cols, **kw))
        self.lora_B = nn.Parameter(torch.zeros(rows, inner, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.runtime_gain = runtime_gain
        self.multiplier = self.scale / runtime_gain

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).view(weight.shape)
        return weight + delta * self.multiplier

    def extra_repr(self) -> str:
        return f"A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}, scale={self.scale:g}"


class BiasDelta(nn.Module):
    """Parametrization ``b -> b + bias_delta`` (zero at init): a trainable bias that leaves the base intact."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros_like(bias))

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.bias_delta


@dataclass
class LoraState:
    """What `add_lora` did: settings, the adapted layers (module paths in G) and the base's grad flags."""

    rank: int
    alpha: float
    train_biases: bool
    targets: tuple[str, ...]
    conv_layout: str = "my3dgen"
    modulated: list[str] = field(default_factory=list)  # SynthesisLayer / ToRGBLayer paths (their .weight)
    affine: list[str] = field(default_factory=list)  # their .affine FullyConnectedLayer paths
    requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)  # restored by remove_lora

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layers(self) -> list[str]:
        return self.modulated + self.affine


def get_lora_state(G: nn.Module) -> LoraState | None:
    """The `LoraState` of G's attached adapters, or None."""
    return G.__dict__.get(_STATE_ATTR)


def _require_state(G: nn.Module) -> LoraState:
    state = get_lora_state(G)
    if state is None:
        raise ValueError("this generator has no LoRA adapters; call add_lora(G, ...) or load_adapter(G, ...) first")
    return state


def add_lora(
    G: nn.Module,
    rank: int = 1,
    alpha: float = 1.0,
    train_biases: bool = False,
    targets: tuple[str, ...] | list[str] = ("synthesis", "superresolution"),
    conv_layout: str = "my3dgen",
) -> LoraState:
    """Freeze G and attach rank-``rank`` adapters (scale ``alpha / rank``) to every modulated conv and its affine.

    ``targets``: "synthesis" (the tri-plane backbone) and/or "superresolution". ``conv_layout``:
    "my3dgen" or "loralib" (the shapes of the conv adapters, see the module docstring). Every base
    parameter gets ``requires_grad=False``; the adapter tensors (and the bias deltas with ``train_biases``) are the only
    trainable ones -- `lora_parameters` lists them. G is modified in place; `remove_lora` undoes it.
    """
    if get_lora_state(G) is not None:
        raise ValueError("this generator already has LoRA adapters; remove_lora(G) first")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {sorted(TARGETS)}, got {list(targets)}")
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout must be one of {', '.join(CONV_LAYOUTS)}, got {conv_layout!r}")

    state = LoraState(rank=rank, alpha=float(alpha), train_biases=bool(train_biases), targets=targets,
                      conv_layout=conv_layout)
    state.requires_grad = {name: p.requires_grad for name, p in G.named_parameters()}
    G.requires_grad_(False)
    for target in targets:
        root = G.get_submodule(TARGETS[target])
        for sub, layer in root.named_modules(prefix=TARGETS[target]):
            if not isinstance(layer, (SynthesisLayer, ToRGBLayer)):
                continue
            # Conv weights are used as stored (ToRGB's weight_gain scales the styles, not the weight).
            _adapt(layer, LoraDelta(layer.weight, rank, alpha, layout=conv_layout), train_biases)
            state.modulated.append(sub)
            # FullyConnectedLayer multiplies its stored weight by weight_gain (1/sqrt(in)) at run time,
            # but My3DGen adds x @ A^T @ B^T * alpha/r *unscaled*; dividing the delta by weight_gain here
            # makes (W + delta / g) * g = W * g + delta, so the layer's own gain cancels out.
            affine = layer.affine
            _adapt(affine, LoraDelta(affine.weight, rank, alpha, runtime_gain=affine.weight_gain), train_biases)
            state.affine.append(f"{sub}.affine")
    G.__dict__[_STATE_ATTR] = state
    return state


def _adapt(module: nn.Module, delta: LoraDelta, train_biases: bool) -> None:
    parametrize.register_parametrization(module, "weight", delta)
    if train_biases and getattr(module, "bias", None) is not None:
        # The affine's bias_gain is 1 (lr_multiplier 1), so the delta adds to the effective bias as is.
        parametrize.register_parametrization(module, "bias", BiasDelta(module.bias))


def _adapter_modules(G: nn.Module, state: LoraState):
    """(layer path, module) for every adapted layer, in a fixed order."""
    for name in state.layers:
        yield name, G.get_submodule(name)


def _adapter_tensors(G: nn.Module) -> dict[str, nn.Parameter]:
    """``<layer>.lora_A`` / ``.lora_B`` / ``.bias_delta`` -> the live Parameter."""
    state = _require_state(G)
    tensors: dict[str, nn.Parameter] = {}
    for name, module in _adapter_modules(G, state):
        lora = module.parametrizations.weight[0]
        tensors[f"{name}.lora_A"] = lora.lora_A
        tensors[f"{name}.lora_B"] = lora.lora_B
        if "bias" in module.parametrizations:
            tensors[f"{name}.bias_delta"] = module.parametrizations.bias[0].bias_delta
    return tensors


def lora_parameters(G: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors: every lora_A / lora_B (and bias delta with ``train_biases``)."""
    return list(_adapter_tensors(G).values())


def count_lora_parameters(G: nn.Module) -> int:
    """Trainable adapter parameters (LoRA A/B plus the bias deltas when ``train_biases``)."""
    return sum(p.numel() for p in lora_parameters(G))


def lora_parameter_breakdown(G: nn.Module) -> dict[str, int]:
    """Adapter parameters split like My3DGen's table: backbone/SR x conv/affine, then biases and totals."""
    out = dict.fromkeys(
        ("backbone_conv", "backbone_affine", "sr_conv", "sr_affine", "lora", "biases", "total"), 0
    )
    state = _require_state(G)
    affine = set(state.affine)
    for key, p in _adapter_tensors(G).items():
        layer, kind = key.rsplit(".", 1)
        if kind == "bias_delta":
            out["biases"] += p.numel()
            continue
        part = "sr" if layer.startswith(TARGETS["superresolution"] + ".") else "backbone"
        out[f"{part}_{'affine' if layer in affine else 'conv'}"] += p.numel()
        out["lora"] += p.numel()
    out["total"] = out["lora"] + out["biases"]
    return out


def lora_state_dict(G: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapter tensors only (keys ``<layer>.lora_A`` / ``.lora_B`` / ``.bias_delta``)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in _adapter_tensors(G).items()}


def load_lora_state_dict(G: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into G's attached adapters; keys and shapes must match exactly."""
    live = _adapter_tensors(G)
    missing = sorted(set(live) - set(sd))
    unexpected = sorted(set(sd) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match this generator's adapters: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''} ({len(missing)}), unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)})"
        )
    for key, p in live.items():
        if tuple(sd[key].shape) != tuple(p.shape):
            raise ValueError(f"adapter tensor {key} has shape {tuple(sd[key].shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in live.items():
            p.copy_(sd[key])


def remove_lora(G: nn.Module, merge: bool = False) -> nn.Module:
    """Detach the adapters. ``merge=False``: G is the base again, bit for bit. ``merge=True``: the updates
    are baked into the weights (and biases), giving a plain generator that renders like the adapted one.

    The base parameters' ``requires_grad`` flags are restored to what they were before `add_lora`.
    """
    state = _require_state(G)
    for _, module in _adapter_modules(G, state):
        for tensor_name in list(module.parametrizations.keys()):
            # leave_parametrized=True writes W + delta into the original Parameter object (same id);
            # False puts the untouched original back.
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=merge)
    del G.__dict__[_STATE_ATTR]
    for name, p in G.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    return G


def _base_tensors(G: nn.Module) -> dict[str, torch.Tensor]:
    """G's state dict under base key names, adapter tensors left out (the base of an adapted G)."""
    out = {}
    for key, tensor in G.state_dict().items():
        if _PARAMETRIZATION_KEY.search(key):
            continue
        out[_ORIGINAL_KEY.sub(r".\1", key)] = tensor
    return out


def base_hash(G: nn.Module, length: int = 16) -> str:
    """Short sha256 of the base generator: key, shape and float32 bytes of every state-dict tensor, keys sorted.

    Adapters (and bias deltas) are ignored, so it is the same before and after `add_lora` and training.
    A merged generator (``remove_lora(merge=True)``) is a different base and hashes differently.
    """
    h = hashlib.sha256()
    tensors = _base_tensors(G)
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu", torch.float32).contiguous().reshape(-1)
        h.update(f"{key}:{tuple(tensors[key].shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:length]


_base_hash = base_hash  # save_adapter / load_adapter take a ``base_hash`` argument that shadows the function


def save_adapter(
    G: nn.Module,
    path: str | Path,
    base_hash: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    extra: dict | None = None,
) -> Path:
    """Write folder ``path`` with ``adapter.safetensors`` + ``adapter.json``, atomically.

    ``base_hash`` (the base generator's `base_hash`, computed when None), ``rank`` and ``alpha`` are
    checked against G so a file can never describe a different adapter than the one it holds.
    ``extra`` (JSON-serialisable) is stored under ``"extra"``.
    """
    from safetensors.torch import save_file

    from .. import __version__

    state = _require_state(G)
    actual = _base_hash(G)
    if base_hash is not None and base_hash != actual:
        raise ValueError(f"base_hash {base_hash} does not match this generator's base ({actual})")
    if rank is not None and rank != state.rank:
        raise ValueError(f"rank {rank} does not match the attached adapters (rank {state.rank})")
    if alpha is not None and float(alpha) != state.alpha:
        raise ValueError(f"alpha {alpha} does not match the attached adapters (alpha {state.alpha})")
    sd = lora_state_dict(G)
    counts = lora_parameter_breakdown(G)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": state.rank,
        "alpha": state.alpha,
        "train_biases": state.train_biases,
        "targets": list(state.targets),
        "conv_layout": state.conv_layout,
        "base_hash": actual,
        "genfast_version": __version__,
        "parameter_count": counts["total"],
        "parameter_breakdown": counts,
        "layers": {"modulated": len(state.modulated), "affine": len(state.affine)},
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT, "base_hash": actual})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict:
    """``adapter.json`` of an adapter folder (FileNotFoundError if either adapter file is missing)."""
    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: {path} is not a complete adapter folder")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path / ADAPTER_CONFIG} is not a {FORMAT} v{FORMAT_VERSION} adapter "
            f"(format {config.get('format')!r}, version {config.get('format_version')!r})"
        )
    return config


def load_adapter(G: nn.Module, path: str | Path, base_hash: str | None = None) -> LoraState:
    """Attach the adapter saved in folder ``path`` to base G (in place) and return its `LoraState`.

    G's base hash is always computed from G's own weights, and an adapter trained on another base is
    refused with a ValueError naming both hashes. ``base_hash``, when given, is what the caller
    expects G to be: it is checked against G too (as in `save_adapter`), never used in G's place --
    a caller's hash must not be able to talk the check into accepting a foreign adapter.
    On any error G is left as it was.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    actual = _base_hash(G)
    if base_hash is not None and base_hash != actual:
        raise ValueError(f"base_hash {base_hash} does not match this generator's base ({actual})")
    if config["base_hash"] != actual:
        raise ValueError(
            f"adapter {path} was trained on base generator {config['base_hash']}, "
            f"but this generator's base is {actual}; load the base checkpoint it was trained on"
        )
    sd = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    state = add_lora(G, rank=config["rank"], alpha=config["alpha"], train_biases=config["train_biases"],
                     targets=config["targets"], conv_layout=config.get("conv_layout", "my3dgen"))
    try:
        load_lora_state_dict(G, sd)
    except BaseException:
        remove_lora(G)
        raise
    return state
