"""LaMamba-Diff (Fu, Chen, Yu; arXiv 2408.02615) as a diffusers model that runs in `DiTPipeline`.

Written from the official code (yunxiangfu2001/LaMamba-Diff @27b3c1d, `model/lamamba.py`,
`model/vmamba.py` forward_type v2, `model/continuous_scan.py`); same layout, blocks and
initialisation, our own implementation. One block, three adaLN-Zero-gated residual steps in turn::

    (shift, scale, gate) x 3 = Linear(SiLU(proj(c)))          # 9 * dim, zero-initialised
    x = x + gate1 * SS2D(modulate(LN(x)))                      # 4 snake scans, summed
    x = x + gate2 * WindowAttention(modulate(LN(x)))           # Swin W-MSA / SW-MSA, rel-pos bias
    x = x + gate3 * MLP(modulate(LN(x)))

The U-Net: patch-1 conv stem + LN + learnable (sin-cos initialised) position embedding; encoder
stages at widths `dims`, PatchMerging after all but the last two (which share the lowest
resolution); a bottleneck applied as x + mid(x); decoder stages mirrored with one block more each
(the SD-UNet design), PatchExpanding between them, encoder features *added* as skips; final adaLN,
then a Linear to `out_channels` (2 * in_channels: epsilon and the learned variance).

Conditioning is c = t_emb + y_emb at width dims[-1]. The label table has num_classes + 1 rows, the
last one the null class of classifier-free guidance; `DiTPipeline` sends id 1000 for it, so id
1000 (and id num_classes) both read that row. Label dropout is the trainer's job.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import DIT_NULL_CLASS, FREQ_DIM, Stage, class_condition, stage_heads
from .scan import check_backend, selective_scan

K_SCANS = 4
_MASKED = -100.0  # added to attention logits across shifted-window seams; exp(-100) is 0 in practice


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


# Index tensors depend only on the grid, so they are built once per (size, device). Built outside
# inference mode so that a first call under torch.inference_mode() cannot poison later training.


@functools.lru_cache(maxsize=64)
def snake_paths(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The four continuous scans of LaMamba-Diff over a height x width grid, as (paths, inverses).

    paths[k] lists raster indices in scan order (consecutive tokens are always grid neighbours):
    a row snake from the top-left, a row snake from the bottom-left, a column snake from the
    bottom-left and a column snake from the bottom-right. inverses[k] = argsort(paths[k]).
    """
    with torch.inference_mode(False):
        grid = torch.arange(height * width, device=device).view(height, width)

        def snake(rows: torch.Tensor) -> torch.Tensor:  # reverse every second line
            rows = rows.clone()
            rows[1::2] = rows[1::2].flip(-1)
            return rows.flatten()

        up = grid.flip(0)  # rows from the bottom
        paths = torch.stack([snake(grid), snake(up), snake(up.t()), snake(up.flip(1).t())])
        return paths, paths.argsort(-1)


@functools.lru_cache(maxsize=16)
def _relative_index(window: int, device: torch.device) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2-row relative position bias table."""
    with torch.inference_mode(False):
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
        rel = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :] + (window - 1)
        return (rel[0] * (2 * window - 1) + rel[1]).to(device)


@functools.lru_cache(maxsize=64)
def _shift_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(n_windows, w*w, w*w) additive mask keeping a shifted window's attention within each region."""
    with torch.inference_mode(False):
        region = torch.zeros(height, width)
        bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rows in enumerate(bounds):
            for j, cols in enumerate(bounds):
                region[rows, cols] = 3 * i + j
        ids = _partition(region[None, :, :, None], window).flatten(1)  # (n_windows, w*w)
        mask = (ids[:, None, :] != ids[:, :, None]).float() * _MASKED
        return mask.to(device)


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * n_windows, window, window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _unpartition(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class SS2D(nn.Module):
    """VMamba's 2D selective scan (forward_type v2) with LaMamba's four continuous snake scans.

    in_proj -> (x, z); x: depthwise 3x3 conv, SiLU, four scans with their own x_proj / dt_proj /
    A / D, merged back to raster order and summed; LayerNorm; times SiLU(z); out_proj.
    Channels-last in and out: (B, H, W, dim).
    """

    def __init__(self, dim: int, d_state: int, ssm_ratio: float, dt_rank, scan_backend: str):
        super().__init__()
        inner = int(ssm_ratio * dim)
        self.inner, self.d_state = inner, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=False)
        self.x_proj_weight = nn.Parameter(torch.empty(K_SCANS, self.dt_rank + 2 * d_state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(K_SCANS, inner, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(K_SCANS, inner))
        self.A_log = nn.Parameter(torch.empty(K_SCANS * inner, d_state))
        self.D = nn.Parameter(torch.empty(K_SCANS * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        """Mamba's initialisation (official `initialize="v0"`)."""
        bound = self.inner**-0.5  # nn.Linear's default for the per-scan x_proj
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_proj_weight.uniform_(-(self.dt_rank**-0.5), self.dt_rank**-0.5)
        # dt = softplus(bias) log-uniform in [dt_min, dt_max] at init: bias = dt + log(1 - exp(-dt))
        u = torch.rand(self.dt_proj_bias.shape, device=self.dt_proj_bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., d_state) for every channel
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(states).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        length, rank, n = h * w, self.dt_rank, self.d_state
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))  # (B, inner, H, W)
        paths, inverses = snake_paths(h, w, x.device)
        xs = x.flatten(2)[:, :, paths].transpose(1, 2)  # (B, K, inner, L), each in its scan order
        proj = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dt, B, C = proj.split([rank, n, n], dim=2)
        dt = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj_weight)
        ys = selective_scan(
            xs.reshape(b, -1, length), dt.reshape(b, -1, length), -torch.exp(self.A_log.float()),
            B, C, self.D, self.dt_proj_bias.reshape(-1), delta_softplus=True, backend=self.scan_backend,
        ).view(b, K_SCANS, self.inner, length)
        # each scan's outputs back to raster order, then the four summed
        y = ys.gather(-1, inverses[None, :, None, :].expand_as(ys)).sum(1)
        y = self.out_norm(y.transpose(1, 2).to(z.dtype)).view(b, h, w, self.inner)
        return self.out_proj(y * F.silu(z))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int):
        super().__init__()
        self.num_heads, self.window, self.shift = num_heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        win, shift, heads = self.window, self.shift, self.num_heads
        tokens = win * win
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        # (3, B, n_windows, heads, tokens, head_dim)
        qkv = _partition(self.qkv(x), win).view(b, -1, tokens, 3, heads, c // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)
        index = _relative_index(win, x.device)
        bias = self.relative_position_bias_table[index.flatten()].view(tokens, tokens, heads).permute(2, 0, 1)
        if shift:  # a per-window mask: keep the window axis (SDPA broadcasts over leading dims)
            bias = bias + _shift_mask(h, w, win, shift, x.device)[:, None]  # (n_windows, heads, T, T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:  # one bias for all windows: 4-D, so the fused kernels apply
            out = F.scaled_dot_product_attention(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn_mask=bias[None].to(q.dtype)
            )
        out = out.reshape(-1, heads, tokens, c // heads).transpose(1, 2).reshape(-1, win, win, c)
        out = _unpartition(self.proj(out), win, h, w)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out


class LaMambaBlock(nn.Module):
    """SS2D, window attention and MLP in turn, each as an adaLN-Zero-gated residual (9-way modulation).

    `project_condition` adds a Linear from the conditioning width to `dim` (the official code does
    so when the widths differ, and in every decoder block).
    """

    def __init__(self, dim: int, cond_dim: int, *, num_heads: int, resolution: int, window: int,
                 shift: int, mlp_ratio: float, d_state: int, ssm_ratio: float, dt_rank,
                 scan_backend: str, project_condition: bool):
        super().__init__()
        if resolution <= window:  # the window covers the whole map: plain global attention
            window, shift = resolution, 0
        self.cond_proj = nn.Linear(cond_dim, dim) if project_condition else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        self.norm_ssm = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, d_state, ssm_ratio, dt_rank, scan_backend)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, shift)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(self.cond_proj(c))[:, None, None, :].chunk(9, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = mods
        x = x + gate1 * self.ssm(_modulate(self.norm_ssm(x), shift1, scale1))
        x = x + gate2 * self.attn(_modulate(self.norm_attn(x), shift2, scale2))
        return x + gate3 * self.mlp(_modulate(self.norm_mlp(x), shift3, scale3))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated, LayerNorm, Linear: (B, H, W, C) -> (B, H/2, W/2, out_dim)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Linear to scale^2 * out_dim, pixel shuffle, LayerNorm: (B, H, W, C) -> (B, sH, sW, out_dim)."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, -1)
        return self.norm(x)


def _check_config(cfg: dict) -> None:
    """Refuse a configuration the layout cannot build, naming the field and the fix."""
    dims, depths, n = list(cfg["dims"]), list(cfg["depths"]), len(cfg["dims"])
    if n < 2 or len(depths) != n:
        raise ValueError(f"dims and depths need the same length, at least 2 (one per stage); got {dims}, {depths}")
    if any(d < 1 for d in depths) or cfg["bottleneck_depth"] < 1:
        raise ValueError(f"depths and bottleneck_depth must be at least 1; got {depths}, {cfg['bottleneck_depth']}")
    if dims[-2] != dims[-1]:
        raise ValueError(f"dims[-2] must equal dims[-1]: the last two stages share the lowest resolution "
                         f"(identity downsample); got {dims}")
    if dims[0] % 4:
        raise ValueError(f"dims[0] must be a multiple of 4 (2D sin-cos position embedding); got {dims[0]}")
    heads = cfg["num_heads"]
    if not isinstance(heads, int) and len(heads) != n:
        raise ValueError(f"num_heads must be an int or one per stage ({n}); got {heads}")
    for dim, h in zip(dims, stage_heads(heads, n)):
        if h < 1 or dim % h:
            raise ValueError(f"num_heads must divide every stage width: {dim} % {h} != 0 (num_heads={heads})")
    if not 1 <= cfg["num_classes"] <= DIT_NULL_CLASS:
        raise ValueError(f"num_classes must be in 1..{DIT_NULL_CLASS} (DiTPipeline sends id {DIT_NULL_CLASS} "
                         f"for the null class); got {cfg['num_classes']}")
    p, size, window = cfg["patch_size"], cfg["sample_size"], cfg["window_size"]
    if p < 1 or size % p:
        raise ValueError(f"sample_size ({size}) must be a multiple of patch_size ({p})")
    grid, down = size // p, 2 ** (n - 2)
    if grid % down:
        raise ValueError(f"sample_size / patch_size = {grid} must be divisible by {down} ({n - 2} PatchMerging steps)")
    for res in {grid >> i for i in range(n - 1)}:
        if res > window and res % window:
            raise ValueError(f"a {res}x{res} stage does not tile into {window}x{window} windows: choose "
                             f"window_size dividing every stage size above it (stage sizes: grid {grid} halved "
                             f"{n - 2} times)")
    if window < 1 or cfg["d_state"] < 1 or cfg["ssm_ratio"] <= 0 or cfg["mlp_ratio"] <= 0:
        raise ValueError("window_size and d_state must be >= 1, ssm_ratio and mlp_ratio > 0; got "
                         f"{window}, {cfg['d_state']}, {cfg['ssm_ratio']}, {cfg['mlp_ratio']}")
    rank = cfg["dt_rank"]
    if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"dt_rank must be 'auto' (ceil(dim / 16)) or a positive int; got {rank!r}")
    if cfg["in_channels"] < 1 or cfg["out_channels"] < 1:
        raise ValueError(
            f"in_channels and out_channels must be positive; got {cfg['in_channels']}, {cfg['out_channels']}"
        )
    check_backend(cfg["scan_backend"])


class LaMambaDiffModel(ModelMixin, ConfigMixin):
    """LaMamba-Diff denoiser; `forward(hidden_states, timestep, class_labels)` as DiTPipeline calls it.

    Defaults are the official XL (`configs/LaMamba-DIff-XL.yaml` with --num-heads 16, 256^2 images
    through the SD VAE); `genfast.backbones.lamamba_config(name)` gives the named sizes.

    Args:
        sample_size: latent side (the input must be sample_size x sample_size).
        in_channels / out_channels: latent channels; out = 2 * in predicts epsilon and the variance.
        num_classes: K; the label table has K + 1 rows, row K the null class (ids K and 1000).
        patch_size: stem conv stride (the official model uses 1).
        dims, depths: width and block count of each encoder stage; the decoder mirrors them with one
            block more per stage. PatchMerging follows all stages but the last two.
        bottleneck_depth: blocks in the bottleneck, applied as x + mid(x).
        num_heads: attention heads, one int or one per encoder stage (the decoder mirrors).
        window_size: attention window; a stage no larger than it attends globally.
        mlp_ratio, d_state, ssm_ratio: MLP expansion, SSM state size, SS2D inner width / dim.
        dt_rank: rank of the dt projection, "auto" = ceil(dim / 16).
        scan_backend: "auto" | "parallel" | "sequential" | "mamba_ssm" (see genfast.backbones.scan).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LaMambaBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int = 8,
        num_classes: int = 1000,
        patch_size: int = 1,
        dims: tuple[int, ...] = (320, 640, 1280, 1280),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        bottleneck_depth: int = 2,
        num_heads: int | tuple[int, ...] = 16,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        scan_backend: str = "auto",
    ):
        super().__init__()
        _check_config(dict(self.config))
        dims, depths, n = list(dims), list(depths), len(dims)
        heads = stage_heads(num_heads, n)
        cond_dim = dims[-1]
        grid = sample_size // patch_size
        self.gradient_checkpointing = False

        def block(dim, res, index, h, project):
            return LaMambaBlock(
                dim, cond_dim, num_heads=h, resolution=res, window=window_size,
                shift=0 if index % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, d_state=d_state,
                ssm_ratio=ssm_ratio, dt_rank=dt_rank, scan_backend=scan_backend, project_condition=project,
            )

        self.time_proj = Timesteps(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)  # [cos, sin] as DiT
        self.time_embed = TimestepEmbedding(FREQ_DIM, cond_dim)
        self.class_embed = nn.Embedding(num_classes + 1, cond_dim)

        self.stem = nn.Conv2d(in_channels, dims[0], kernel_size=patch_size, stride=patch_size)
        self.stem_norm = nn.LayerNorm(dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dims[0]))

        low = grid >> (n - 2)  # the last two stages, the bottleneck and the first two decoder stages
        self.down_stages = nn.ModuleList()
        for i in range(n):
            res = grid >> min(i, n - 2)
            merge = PatchMerging(dims[i], dims[i + 1]) if i < n - 2 else None
            blocks = [block(dims[i], res, j, heads[i], dims[i] != cond_dim) for j in range(depths[i])]
            self.down_stages.append(Stage(blocks, merge))
        self.mid_blocks = nn.ModuleList(block(cond_dim, low, j, heads[-1], False) for j in range(bottleneck_depth))
        self.up_stages = nn.ModuleList()
        for i in range(n):
            s = n - 1 - i  # the encoder stage this one mirrors (and takes its skip from)
            expand = PatchExpanding(dims[s + 1], dims[s]) if i >= 2 else None
            res = grid >> (n - 2 if i == 0 else s)
            blocks = [block(dims[s], res, j, heads[s], True) for j in range(depths[s] + 1)]
            self.up_stages.append(Stage(blocks, expand))

        self.final_expand = PatchExpanding(dims[0], dims[0], scale=patch_size)
        self.final_cond_proj = nn.Linear(cond_dim, dims[0])
        self.final_norm = nn.LayerNorm(dims[0], elementwise_affine=False, eps=1e-6)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dims[0], 2 * dims[0]))
        self.proj_out = nn.Linear(dims[0], out_channels)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The official initialisation: xavier Linears (zero bias), DiT's embedder and adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.stem.weight.view(self.stem.weight.shape[0], -1))
        nn.init.zeros_(self.stem.bias)
        grid = self.pos_embed.shape[1]
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, base_size=grid, device=self.pos_embed.device)
        self.pos_embed.copy_(pos.view(self.pos_embed.shape))
        nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for block in self.blocks():
            nn.init.trunc_normal_(block.attn.relative_position_bias_table, std=0.02)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)  # the final Linear stays xavier, as official

    def blocks(self) -> list[LaMambaBlock]:
        """Every LaMamba block in call order: encoder, bottleneck, decoder (genfast.pipelines.blocks reads
        this list: feature inheritance treats the blocks as a transformer's)."""
        down = [b for stage in self.down_stages for b in stage.blocks]
        return down + list(self.mid_blocks) + [b for stage in self.up_stages for b in stage.blocks]

    def set_scan_backend(self, backend: str) -> None:
        """Switch every SS2D to another scan backend (recorded in the config, so it saves)."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, SS2D):
                module.scan_backend = backend
        self.register_to_config(scan_backend=backend)

    def _run(self, block: LaMambaBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, c)
        return block(x, c)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and the variance channels) for latents (B, in_channels, S, S).

        timestep: a scalar or (B,); class_labels: (B,) ids, with num_classes or 1000 for the null class.
        Returns Transformer2DModelOutput(sample=(B, out_channels, S, S)), or a 1-tuple.
        """
        cfg = self.config
        _, channels, h, w = hidden_states.shape
        if channels != cfg.in_channels or h != cfg.sample_size or w != cfg.sample_size:
            raise ValueError(f"hidden_states must be (B, {cfg.in_channels}, {cfg.sample_size}, {cfg.sample_size}) "
                             f"(in_channels, sample_size); got {tuple(hidden_states.shape)}")
        c = class_condition(self, hidden_states, timestep, class_labels)

        x = self.stem_norm(self.stem(hidden_states).permute(0, 2, 3, 1)) + self.pos_embed
        skips = []
        for stage in self.down_stages:
            for blk in stage.blocks:
                x = self._run(blk, x, c)
            skips.append(x)
            if stage.resample is not None:
                x = stage.resample(x)
        mid = x
        for blk in self.mid_blocks:
            mid = self._run(blk, mid, c)
        x = x + mid
        for stage, skip in zip(self.up_stages, reversed(skips)):
            if stage.resample is not None:
                x = stage.resample(x)
            x = x + skip
            for blk in stage.blocks:
                x = self._run(blk, x, c)

        shift, scale = self.final_adaLN_modulation(self.final_cond_proj(c))[:, None, None, :].chunk(2, dim=-1)
        x = self.proj_out(_modulate(self.final_norm(self.final_expand(x)), shift, scale))
        sample = x.permute(0, 3, 1, 2).contiguous()
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
