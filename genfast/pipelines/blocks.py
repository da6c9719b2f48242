"""The repeated blocks of a diffusers denoiser, and how a transformer block's inputs map to its outputs.

Transformer denoisers keep their blocks in `nn.ModuleList`s under a few names; dual-stream
models (SD3, Flux, AuraFlow, HunyuanVideo) have two lists, run one after the other, and their
blocks take and return both the image stream (`hidden_states`) and the text stream
(`encoder_hidden_states`), in an order that differs between models. diffusers records that
order in its `TransformerBlockRegistry`; blocks it has not registered are looked up in a small
table here, and a block that returns a single tensor needs no entry.

A denoiser whose blocks sit in nested stages rather than in one list (LaMamba-Diff's U-Net, whose
22 blocks live in encoder / bottleneck / decoder stages joined by added skips) lists them itself
with a `blocks()` method, in call order; its blocks are then treated as one transformer block list.
For feature inheritance (level="block") that means: on a partial step each reused block adds the
residual it kept on the last full step to its fresh input, while everything between blocks (stem,
PatchMerging / PatchExpanding, the added skips, the final layer) and the blocks outside the span
run fresh. A span that leaves the first encoder stage and the last decoder stage out (blocks
"2:19" on LaMamba's 22) is DeepCache's reading: shallow path fresh, the deep part inherited.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks._helpers import TransformerBlockRegistry

# ModuleList attributes that hold transformer blocks, as diffusers' models name them
BLOCK_LISTS = ("joint_transformer_blocks", "transformer_blocks", "single_transformer_blocks", "blocks", "layers")

# (index of hidden_states, index of encoder_hidden_states) in the output of blocks diffusers has
# not registered (diffusers 0.42); a registered class takes diffusers' own entry
_OUTPUT_ORDER = {"AuraFlowJointTransformerBlock": (1, 0)}

# the forward parameter that carries a stream, for blocks that do not call it by its diffusers name
_STREAM_PARAMS = {"LaMambaBlock": {"hidden_states": "x"}}


def denoiser_kind(denoiser: torch.nn.Module) -> str | None:
    """'unet' (down/mid/up blocks with skip connections), 'transformer' (lists of blocks) or None."""
    if all(hasattr(denoiser, a) for a in ("down_blocks", "mid_block", "up_blocks", "conv_in")):
        return "unet"
    return "transformer" if transformer_blocks(denoiser) else None


def transformer_blocks(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every block of a transformer denoiser as (qualified name, module), in the order they run.

    Lists are taken in the order the model registered them, which is the order its forward
    runs them (joint / double-stream blocks before single-stream ones) in every diffusers model.
    """
    found = []
    for name, child in denoiser.named_children():
        if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList) and len(child):
            found += [(f"{name}.{i}", block) for i, block in enumerate(child)]
    if not found and inspect.isfunction(getattr(type(denoiser), "blocks", None)):  # the model lists its own
        names = {id(module): name for name, module in denoiser.named_modules()}
        found = [(names[id(block)], block) for block in denoiser.blocks()]
    return found


def output_order(block: torch.nn.Module) -> tuple[int, int | None] | None:
    """Where hidden_states and encoder_hidden_states sit in the block's tuple output (None: unknown)."""
    try:
        meta = TransformerBlockRegistry.get(type(block))
        return meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    except ValueError:
        return _OUTPUT_ORDER.get(type(block).__name__)


class BlockIO:
    """Reads a block's stream inputs from its call arguments and splits its output into streams."""

    STREAMS = ("hidden_states", "encoder_hidden_states")

    def __init__(self, block: torch.nn.Module):
        self.name = type(block).__name__
        self.params = list(inspect.signature(type(block).forward).parameters)[1:]
        self.order = output_order(block)
        aliases = _STREAM_PARAMS.get(self.name, {})
        self.names = [aliases.get(stream, stream) for stream in self.STREAMS]

    def inputs(self, args, kwargs) -> list[torch.Tensor | None]:
        found = []
        for stream in self.names:
            if stream in kwargs:
                found.append(kwargs[stream])
            elif stream in self.params and self.params.index(stream) < len(args):
                found.append(args[self.params.index(stream)])
            else:
                found.append(None)
        return found

    def streams(self, output) -> list[int | None]:
        """For each stream, its index in a tuple output (a tensor output is the image stream alone)."""
        if isinstance(output, torch.Tensor):
            return [None, None]
        if self.order is None:
            raise TypeError(
                f"{self.name} returns a tuple and genfast does not know which element is hidden_states and which "
                f"encoder_hidden_states; register the class with diffusers.hooks._helpers.TransformerBlockRegistry "
                f"(TransformerBlockMetadata(return_hidden_states_index=..., return_encoder_hidden_states_index=...))"
            )
        return list(self.order)
