"""ME-CondConv: a convolution whose kernel is mixed per sample from experts, built from an existing Conv2d.

What is the papers':
  - CondConv (Yang et al. 2019): each sample gets its own kernel, a mixture of K expert kernels
    W(x) = a_1 E_1 + ... + a_K E_K with routing weights a = sigmoid(GAP(x) R) computed from the globally
    average-pooled input; the mixed kernel is applied once, so a sample costs one convolution.
  - A-SDM's ME-CondConv ("CLME-CondConv") inherits the original convolution parameters across layers
    when the UNet is pruned, instead of starting the experts from scratch.

What is our reading (A-SDM publishes no formulation):
  - The kernel of the conv this layer came from, W0, is kept outside the mixture as a base:
    W(x) = W0 + sum_k g_k * a_k(x) * E_k.
  - g (`gates`, one scalar per expert) starts at zero, so at init the layer is exactly the conv it came
    from, and training opens each expert gradually (gradients reach g at init through a_k E_k).
  - Cross-layer inheritance: the kernels of layers the pruning removed become extra experts of a
    surviving layer. Which removed kernels go where (and whether they are cropped or padded to fit) is
    the assembly planner's decision (genfast.assembly.student); experts not given start like a fresh
    Conv2d of that shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MECondConv(nn.Conv2d):
    """A Conv2d plus `experts` (K, out, in/groups, kh, kw), a `router` Linear(in_channels, K) on the pooled
    input, and zero-initialised `gates` (K,). Build it with `MECondConv.from_conv(conv, experts, num_experts)`.
    """

    def __init__(self, *args, num_experts: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.num_experts = num_experts
        self.experts = nn.Parameter(torch.empty(num_experts, *self.weight.shape, **factory))
        for expert in self.experts.data:  # each one the way nn.Conv2d initialises a fresh kernel
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        self.router = nn.Linear(self.in_channels, num_experts, **factory)
        self.gates = nn.Parameter(torch.zeros(num_experts, **factory))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, experts: Sequence[torch.Tensor] = (),
                  num_experts: int | None = None) -> MECondConv:
        """An ME-CondConv whose output equals `conv`'s until its gates move.

        experts: kernels shaped like conv.weight that seed the first experts (e.g. removed layers');
        num_experts: K (default: len(experts)); the experts beyond those given start fresh.
        The conv's weight and bias are copied, so training this layer never touches `conv`.
        """
        if isinstance(conv, MECondConv):
            raise TypeError("this conv is already an MECondConv: convert the plain nn.Conv2d it came from")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        experts = list(experts)
        num_experts = len(experts) if num_experts is None else num_experts
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1 (or experts given), got {num_experts!r}")
        if len(experts) > num_experts:
            raise ValueError(f"{len(experts)} expert kernels given for num_experts={num_experts}: raise "
                             f"num_experts or pass fewer kernels")
        for i, kernel in enumerate(experts):
            if tuple(kernel.shape) != tuple(conv.weight.shape):
                raise ValueError(f"expert {i} has shape {tuple(kernel.shape)}, the conv's weight "
                                 f"{tuple(conv.weight.shape)}: crop or pad it to that shape first")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                  num_experts=num_experts)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
            for i, kernel in enumerate(experts):
                new.experts[i].copy_(kernel)
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_experts={self.num_experts}"

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """a(x): (B, K) sigmoid routing weights from the globally average-pooled input."""
        return torch.sigmoid(self.router(x.mean(dim=(2, 3))))

    def mixed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """W(x): (B, out, in/groups, kh, kw), each sample's kernel."""
        coef = self.routing(x) * self.gates  # (B, K)
        delta = torch.einsum("bk,koihw->boihw", coef, self.experts)
        return self.weight.unsqueeze(0) + delta

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        # nn.Conv2d pads explicitly for the non-zero padding modes; the grouped call must do the same
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"MECondConv takes a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        needs_gate_grad = torch.is_grad_enabled() and self.gates.requires_grad
        if not needs_gate_grad and not torch.compiler.is_compiling() and not bool(self.gates.any()):
            # every gate exactly zero: W(x) = W0, so the plain conv gives the same numbers; taking it makes
            # "equals the conv it came from" hold bit for bit (a grouped conv over the batch may pick another
            # kernel algorithm and round differently) and skips the mixture. When the gates need gradients
            # the mixed path runs, so they get them at init too.
            return super().forward(x)
        batch, channels, height, width = x.shape
        weight = self.mixed_weight(x)
        # one convolution per sample in one call: the batch becomes groups, each with its own kernel
        weight = weight.reshape(batch * self.out_channels, *weight.shape[2:])
        bias = self.bias.repeat(batch) if self.bias is not None else None
        x, padding = self._padded(x.reshape(1, batch * channels, height, width))
        out = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups * batch)
        return out.view(batch, self.out_channels, *out.shape[-2:])


def convert_to_condconv(module: nn.Module, experts_by_name: dict[str, Sequence[torch.Tensor]],
                        num_experts: int) -> list[str]:
    """Replace each named Conv2d submodule of `module` by an MECondConv seeded with its expert kernels.

    experts_by_name: {submodule name: kernels shaped like that conv's weight} (an empty list: all experts
    fresh). Returns the converted names, in the order given.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    targets = {}
    for name, kernels in experts_by_name.items():  # build every replacement (and raise) before changing anything
        try:
            conv = module.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{type(module).__name__} has no submodule {name!r}") from err
        if isinstance(conv, MECondConv) or not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name!r} is a {type(conv).__name__}, not a plain nn.Conv2d to convert")
        targets[name] = MECondConv.from_conv(conv, kernels, num_experts)
    for name, new in targets.items():
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
    return list(targets)
