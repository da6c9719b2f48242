"""GRI attention: self-attention over a token grid as regional (windowed) attention plus a pooled global summary.

A-SDM names GRI attention but publishes no formulation; everything here is our reading:
  - Each query attends, in ONE softmax, to the keys/values of its own window x window region of the
    H x W token grid (regional, exact) and to pooled x pooled average-pooled keys/values of the whole
    map (the global summary, like ToDo's K/V pooling).
  - A pooled token stands for the tokens of its cell that lie OUTSIDE the query's window: its logit gets
    log(that count) (ToMe's proportional attention), so the softmax mass of the far tokens is right and
    cells wholly inside the window (already seen exactly) drop out. Two properties follow: a window
    covering the map is exact full attention, and where keys/values are constant over each pooled cell
    GRI equals full attention whatever the window.
  - Cost O(N (window^2 + pooled^2)): linear in tokens. Where N <= window^2 + pooled^2 the plain full
    attention is no dearer and runs instead (diffusers' AttnProcessor2_0, so those levels are unchanged).
  - Training-free as it stands; `trainable=True` adds a per-head bias on the global tokens' logits
    (zero-initialised: the training-free behaviour) as a parameter (`...attn1.processor.global_bias`).
  - Cross-attention and masked attention run plain attention, unchanged.

A processor needs its grid's shape: 4D inputs carry it; for token sequences `install_gri` puts a forward
pre-hook on the denoiser that records the latent's (H, W), and each processor finds its level by halving (rounding up, as
stride-2 downsampling does) until H x W matches its token count.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

MAX_LEVELS = 16
# processors whose math GRI reproduces on the levels it leaves alone; anything else would be lost
REPLACEABLE = (AttnProcessor2_0, AttnProcessor)


def _check_sizes(window, pooled):
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the side of the regional window in tokens), got {window!r}")
    if isinstance(pooled, bool) or not isinstance(pooled, int) or pooled < 1:
        raise ValueError(f"pooled must be an integer >= 1 (the side of the pooled global summary), got {pooled!r}")


class GridState:
    """The latent's (H, W) of the denoiser's current call, shared by the processors of one denoiser."""

    def __init__(self):
        self.hw: tuple[int, int] | None = None

    def grid_for(self, tokens: int) -> tuple[int, int]:
        if self.hw is None:
            side = math.isqrt(tokens)
            if side * side == tokens:
                return side, side  # no recorded latent: a square grid is the only reading
            raise RuntimeError(f"GRI attention got {tokens} tokens and no latent shape to place them on a grid: "
                               f"install it with genfast.assembly.gri.install_gri(denoiser, ...), which records it")
        h, w = self.hw
        for _ in range(MAX_LEVELS):
            if h * w == tokens:
                return h, w
            h, w = -(-h // 2), -(-w // 2)
        raise RuntimeError(f"GRI attention got {tokens} tokens, which is no power-of-2 downsampling of the "
                           f"{self.hw[0]}x{self.hw[1]} latent: this attention layer is not on the latent's grid")

    def record(self, module, args, kwargs):
        """The denoiser's forward pre-hook: keep the (H, W) of its input."""
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(sample, torch.Tensor) and sample.ndim >= 4:
            self.hw = (int(sample.shape[-2]), int(sample.shape[-1]))


def _grid_hooks(module: nn.Module) -> list[int]:
    """The ids of the GridState.record pre-hooks on `module`."""
    return [key for key, fn in module._forward_pre_hooks.items() if isinstance(getattr(fn, "__self__", None), GridState)]


def _bins(size: int, parts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end of each of adaptive_avg_pool's `parts` bins over `size` (its own rounding)."""
    i = torch.arange(parts, device=device)
    return (i * size) // parts, -((-(i + 1) * size) // parts)


def _overlap(starts, ends, w_starts, w_ends) -> torch.Tensor:
    """(windows, bins) lengths of the intersection of each window's span with each bin's."""
    lo = torch.maximum(starts[None, :], w_starts[:, None])
    hi = torch.minimum(ends[None, :], w_ends[:, None])
    return (hi - lo).clamp(min=0)


@functools.lru_cache(maxsize=64)  # a handful of grid shapes per model; recomputing costs ~20 small ops a call
def _window_mask(height: int, width: int, window: int, pooled_hw: tuple[int, int], device) -> torch.Tensor:
    """(windows, window^2 + P) additive logits: -inf on padded keys; log(count of the cell's tokens outside
    the window) on the pooled keys (-inf where none are)."""
    rows, cols = -(-height // window), -(-width // window)
    real = torch.zeros(rows * window, cols * window, dtype=torch.bool, device=device)
    real[:height, :width] = True
    real = real.view(rows, window, cols, window).permute(0, 2, 1, 3).reshape(rows * cols, window * window)
    regional = torch.zeros(real.shape, device=device).masked_fill(~real, float("-inf"))

    ph, pw = pooled_hw
    r0, r1 = _bins(height, ph, device)
    c0, c1 = _bins(width, pw, device)
    w_r = torch.arange(rows, device=device) * window
    w_c = torch.arange(cols, device=device) * window
    inside = (_overlap(r0, r1, w_r, (w_r + window).clamp(max=height))[:, None, :, None]
              * _overlap(c0, c1, w_c, (w_c + window).clamp(max=width))[None, :, None, :])
    size = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    outside = (size[None, None] - inside).reshape(rows * cols, ph * pw)
    return torch.cat([regional, outside.float().log()], dim=1)


def _to_windows(t: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """(B, heads, N, d) -> (B * windows, heads, window^2, d), zero-padding the grid to whole windows."""
    batch, heads, _, dim = t.shape
    height, width = grid
    t = t.view(batch, heads, height, width, dim)
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_h or pad_w:
        t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = t.shape[2] // window, t.shape[3] // window
    t = t.view(batch, heads, rows, window, cols, window, dim).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(batch * rows * cols, heads, window * window, dim)


def _from_windows(t: torch.Tensor, batch: int, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The inverse of _to_windows, dropping the padding: -> (B, heads, N, d)."""
    height, width = grid
    rows, cols = -(-height // window), -(-width // window)
    _, heads, _, dim = t.shape
    t = t.view(batch, rows, cols, heads, window, window, dim).permute(0, 3, 1, 4, 2, 5, 6)
    t = t.reshape(batch, heads, rows * window, cols * window, dim)[:, :, :height, :width]
    return t.reshape(batch, heads, height * width, dim)


def gri_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: tuple[int, int], window: int,
                  pooled: int, global_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GRI mixing on projected (B, heads, N, d) queries/keys/values of an H x W grid -> (B, heads, N, d).

    One softmax per query over its window's keys and the pooled keys (see the module docstring);
    global_bias: (heads,) added to the pooled keys' logits. Always the windowed path, whatever N.
    """
    batch, heads, tokens, dim = query.shape
    height, width = grid
    if height * width != tokens:
        raise ValueError(f"grid {height}x{width} does not hold the {tokens} tokens given")
    pooled_hw = (min(pooled, height), min(pooled, width))
    n_pooled = pooled_hw[0] * pooled_hw[1]

    def pool(t):  # (B, heads, N, d) -> (B, heads, P, d), averaged over adaptive cells of the grid
        t = t.transpose(2, 3).reshape(batch, heads * dim, height, width)
        return F.adaptive_avg_pool2d(t, pooled_hw).view(batch, heads, dim, n_pooled).transpose(2, 3)

    q = _to_windows(query, grid, window)
    windows = q.shape[0] // batch

    def with_summary(t):  # each window's keys (values) followed by the pooled ones
        summary = pool(t).unsqueeze(1).expand(batch, windows, heads, n_pooled, dim)
        return torch.cat([_to_windows(t, grid, window), summary.reshape(batch * windows, heads, n_pooled, dim)], 2)

    mask = _window_mask(height, width, window, pooled_hw, query.device)[:, None, None, :]  # (windows, 1, 1, S)
    if global_bias is not None:  # on the pooled keys' logits only: (heads, 1, S)
        regional = global_bias.new_zeros(heads, window * window)
        mask = mask + torch.cat([regional, global_bias[:, None].expand(heads, n_pooled)], 1)[:, None].float()
    mask = mask.to(query.dtype).repeat(batch, 1, 1, 1)
    # the softmax scale AttnProcessor2_0 uses (sdpa's default), so the GRI levels match the full ones
    out = F.scaled_dot_product_attention(q, with_summary(key), with_summary(value), attn_mask=mask)
    return _from_windows(out, batch, grid, window)


class GRIAttnProcessor(nn.Module):
    """An attention processor (for `Attention.set_processor`) running GRI attention on self-attention.

    window, pooled: sides in tokens of the regional window and of the pooled summary; trainable: add the
    per-head bias on the global tokens (needs `heads`); grid: the GridState install_gri shares (without
    one, a token sequence must be a square grid).
    """

    def __init__(self, window: int, pooled: int, trainable: bool = False, heads: int | None = None,
                 grid: GridState | None = None, device=None, dtype=None):
        super().__init__()
        _check_sizes(window, pooled)
        if trainable and (not isinstance(heads, int) or heads < 1):
            raise ValueError(f"heads (the attention's head count, an integer >= 1) is needed for trainable=True, "
                             f"got {heads!r}")
        self.window, self.pooled, self.trainable = window, pooled, trainable
        self.grid = grid if grid is not None else GridState()
        self.global_bias = nn.Parameter(torch.zeros(heads, device=device, dtype=dtype)) if trainable else None
        self._full = AttnProcessor2_0()

    def extra_repr(self) -> str:
        return f"window={self.window}, pooled={self.pooled}, trainable={self.trainable}"

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        four_d = hidden_states.ndim == 4
        tokens = hidden_states.shape[2] * hidden_states.shape[3] if four_d else hidden_states.shape[1]
        if (encoder_hidden_states is not None or attention_mask is not None
                or tokens <= self.window ** 2 + self.pooled ** 2):
            return self._full(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        # the projections exactly as diffusers' AttnProcessor2_0 does them
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if four_d:
            batch, channels, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch, channels, tokens).transpose(1, 2)
        else:
            batch = hidden_states.shape[0]
            grid = self.grid.grid_for(tokens)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = gri_attention(query, key, value, grid, self.window, self.pooled, self.global_bias)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attention_layers(denoiser: nn.Module) -> dict[str, Attention]:
    """The self-attention ('attn1') Attention modules of a denoiser, by name."""
    return {name: m for name, m in denoiser.named_modules()
            if isinstance(m, Attention) and name.rpartition(".")[2] == "attn1"}


def install_gri(unet: nn.Module, window: int, pooled: int, trainable: bool = False) -> dict:
    """Put a GRIAttnProcessor on every self-attention ('attn1') layer of `unet` and hook it to record the
    latent's grid. Returns the processors before (as `unet.attn_processors` gives them, for set_attn_processor);
    `uninstall_gri(unet, previous)` puts them back and takes the hook off."""
    _check_sizes(window, pooled)
    if _grid_hooks(unet):
        raise RuntimeError("GRI attention is already installed on this denoiser: uninstall_gri(...) it first")
    layers = self_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no self-attention layers (Attention modules named 'attn1') "
                         f"for GRI attention")
    for name, attn in layers.items():
        if not isinstance(attn.processor, REPLACEABLE):
            raise TypeError(f"{name} runs {type(attn.processor).__name__}; GRI attention replaces only diffusers' "
                            f"plain processors ({', '.join(c.__name__ for c in REPLACEABLE)}), so what that one "
                            f"does would be lost: restore the default with set_attn_processor first")
    # every processor, keyed as `attn_processors` is (which not every denoiser class has, e.g. DiT's)
    previous = {f"{name}.processor": m.get_processor() for name, m in unet.named_modules() if hasattr(m, "get_processor")}
    state = GridState()
    # a plain torch pre-hook, not a diffusers ModelHook: a deepcopy of the denoiser (EMA, a student built
    # from it) then copies the hook bound to the copied GridState its copied processors read, whereas the
    # forward a HookRegistry installs would keep feeding the original's
    unet.register_forward_pre_hook(state.record, with_kwargs=True)
    for attn in layers.values():
        # the bias follows the layer's float parameters (a quantized layer may also hold integer ones)
        weight = next((p for p in attn.parameters() if p.is_floating_point()), None)
        attn.set_processor(GRIAttnProcessor(window, pooled, trainable, heads=attn.heads, grid=state,
                                            device=getattr(weight, "device", None), dtype=getattr(weight, "dtype", None)))
    return previous


def uninstall_gri(unet: nn.Module, previous: dict) -> None:
    """Undo install_gri: the self-attention layers get their processors from `previous` back; the hook goes."""
    for name, attn in self_attention_layers(unet).items():
        if isinstance(attn.processor, GRIAttnProcessor):
            attn.set_processor(previous[f"{name}.processor"])
    for key in _grid_hooks(unet):
        del unet._forward_pre_hooks[key]
        unet._forward_pre_hooks_with_kwargs.pop(key, None)
