"""EG3D's ``TriPlaneGenerator`` in plain PyTorch, its configuration, and the FFHQ-512 / small presets.

A generator is fully described by a JSON-serialisable config (`TriPlaneConfig`): EG3D's own
constructor arguments (so an official checkpoint's ``_init_kwargs`` map onto it directly) plus four
genfast fields that EG3D hard-codes (tri-plane resolution and width, decoder sizes) and the neural
rendering resolution, which EG3D keeps as mutable state. The module tree and state-dict keys are
EG3D's: ``backbone.mapping.*``, ``backbone.synthesis.b*``, ``superresolution.block{0,1}.*``,
``decoder.net.{0,2}.*``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .networks import StyleGAN2Backbone
from .renderer import ImportanceRenderer, OSGDecoder, RaySampler
from .superresolution import resolve_sr_module

__all__ = [
    "FFHQ512_PARAMETER_COUNTS",
    "TriPlaneConfig",
    "TriPlaneGenerator",
    "build_generator",
    "eg3d_ffhq512",
    "eg3d_ffhq512_config",
    "eg3d_small_config",
    "parameter_counts",
]

# Measured on EG3D's own TriPlaneGenerator with the official FFHQ-512 init_kwargs.
FFHQ512_PARAMETER_COUNTS = {
    "backbone.mapping": 800_768,
    "backbone.synthesis": 28_207_533,
    "decoder": 4_257,
    "superresolution": 1_649_578,
    "total": 30_662_136,
}

MAPPING_KEYS = {"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier", "w_avg_beta"}
SYNTHESIS_KEYS = {
    "channel_base",
    "channel_max",
    "num_fp16_res",
    "conv_clamp",
    "fused_modconv_default",
    "architecture",
    "resample_filter",
    "fp16_channels_last",
    "use_noise",
    "activation",
    "kernel_size",
}
SR_KEYS = SYNTHESIS_KEYS | {
    # genfast.SuperresolutionHybrid only: the layout the EG3D presets fix.
    "input_resolution",
    "block_channels",
    "top_resample_filter",
    "resize_only_smaller",
}
REQUIRED_RENDERING_KEYS = (
    "depth_resolution",
    "ray_start",
    "ray_end",
    "box_warp",
    "superresolution_module",
    "sr_antialias",
    "superresolution_noise_mode",
)


def _plain(value):
    """Recursively turn dict subclasses (EasyDict stubs), tuples and numpy scalars into JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _check_keys(what: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unsupported {what} {unknown}; supported: {sorted(allowed)}")


def _validate(mapping_kwargs, rendering_kwargs, sr_kwargs, synthesis_kwargs) -> None:
    _check_keys("mapping_kwargs", mapping_kwargs, MAPPING_KEYS)
    _check_keys("synthesis kwargs", synthesis_kwargs, SYNTHESIS_KEYS)
    _check_keys("sr_kwargs", sr_kwargs, SR_KEYS)
    missing = [k for k in REQUIRED_RENDERING_KEYS if k not in rendering_kwargs]
    if missing:
        raise ValueError(f"rendering_kwargs is missing {missing}")
    resolve_sr_module(rendering_kwargs["superresolution_module"])
    if rendering_kwargs.get("clamp_mode", "softplus") != "softplus":
        raise ValueError(f"clamp_mode must be 'softplus', got {rendering_kwargs['clamp_mode']!r}")
    if "auto" in (rendering_kwargs["ray_start"], rendering_kwargs["ray_end"]):
        raise ValueError("ray_start/ray_end 'auto' (ShapeNet's box intersection) is not supported")
    if not rendering_kwargs["ray_end"] > rendering_kwargs["ray_start"] > 0:
        raise ValueError("rendering_kwargs needs 0 < ray_start < ray_end")
    if rendering_kwargs["depth_resolution"] < 2:
        raise ValueError("rendering_kwargs.depth_resolution must be >= 2")
    if rendering_kwargs["superresolution_noise_mode"] not in ("random", "const", "none"):
        raise ValueError("superresolution_noise_mode must be 'random', 'const' or 'none'")
    if synthesis_kwargs.get("architecture", "skip") not in ("skip", "orig"):
        raise ValueError("only the 'skip' (and 'orig') synthesis architecture is supported")


def _validate_sizes(img_resolution, backbone_resolution, plane_channels) -> None:
    for name, value in (("img_resolution", img_resolution), ("backbone_resolution", backbone_resolution)):
        if value < 4 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 4, got {value}")
    if plane_channels <= 0:
        raise ValueError(f"plane_channels must be > 0, got {plane_channels}")


class TriPlaneGenerator(nn.Module):
    """z, camera -> StyleGAN2 tri-plane -> volume-rendered features -> super-resolved image.

    ``synthesis`` returns ``{'image': [N,3,R,R] in ~[-1,1], 'image_raw': [N,3,r,r], 'image_depth': [N,1,r,r]}``
    with r the neural rendering resolution and R = ``img_resolution``.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        sr_num_fp16_res: int = 0,
        mapping_kwargs: dict | None = None,
        rendering_kwargs: dict | None = None,
        sr_kwargs: dict | None = None,
        backbone_resolution: int = 256,
        plane_channels: int = 32,
        decoder_hidden_dim: int = 64,
        decoder_output_dim: int = 32,
        neural_rendering_resolution: int = 64,
        **synthesis_kwargs,
    ):
        super().__init__()
        mapping_kwargs = _plain(mapping_kwargs or {})
        rendering_kwargs = _plain(rendering_kwargs or {})
        sr_kwargs = _plain(sr_kwargs or {})
        synthesis_kwargs = _plain(synthesis_kwargs)
        _validate(mapping_kwargs, rendering_kwargs, sr_kwargs, synthesis_kwargs)
        _validate_sizes(img_resolution, backbone_resolution, plane_channels)
        self._init_kwargs = copy.deepcopy(
            dict(
                z_dim=z_dim,
                c_dim=c_dim,
                w_dim=w_dim,
                img_resolution=img_resolution,
                img_channels=img_channels,
                sr_num_fp16_res=sr_num_fp16_res,
                mapping_kwargs=mapping_kwargs,
                rendering_kwargs=rendering_kwargs,
                sr_kwargs=sr_kwargs,
                backbone_resolution=backbone_resolution,
                plane_channels=plane_channels,
                decoder_hidden_dim=decoder_hidden_dim,
                decoder_output_dim=decoder_output_dim,
                **synthesis_kwargs,
            )
        )
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.plane_channels = plane_channels
        self.renderer = ImportanceRenderer()
        self.ray_sampler = RaySampler()
        self.backbone = StyleGAN2Backbone(
            z_dim,
            c_dim,
            w_dim,
            img_resolution=backbone_resolution,
            img_channels=3 * plane_channels,
            mapping_kwargs=mapping_kwargs,
            **synthesis_kwargs,
        )
        sr_class = resolve_sr_module(rendering_kwargs["superresolution_module"])
        self.superresolution = sr_class(
            channels=decoder_output_dim,
            img_resolution=img_resolution,
            sr_num_fp16_res=sr_num_fp16_res,
            sr_antialias=rendering_kwargs["sr_antialias"],
            w_dim=w_dim,
            **sr_kwargs,
        )
        decoder_options = {
            "decoder_lr_mul": rendering_kwargs.get("decoder_lr_mul", 1),
            "decoder_output_dim": decoder_output_dim,
        }
        self.decoder = OSGDecoder(plane_channels, decoder_options, hidden_dim=decoder_hidden_dim)
        self.neural_rendering_resolution = int(neural_rendering_resolution)
        self.rendering_kwargs = rendering_kwargs
        self._last_planes = None

    # ---------------------------------------------------------------------------------------------
    # configuration

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def config(self) -> TriPlaneConfig:
        """The config that rebuilds this generator (current rendering settings included)."""
        kwargs = copy.deepcopy(self._init_kwargs)
        kwargs["rendering_kwargs"] = _plain(copy.deepcopy(self.rendering_kwargs))
        kwargs["neural_rendering_resolution"] = self.neural_rendering_resolution
        return TriPlaneConfig.from_dict(kwargs)

    # ---------------------------------------------------------------------------------------------
    # forward passes

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False) -> torch.Tensor:
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        # EG3D's default c_scale is 0 (no pose conditioning) when the key is absent.
        c = c * self.rendering_kwargs.get("c_scale", 0)
        return self.backbone.mapping(
            z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas
        )

    def planes(self, ws: torch.Tensor, noise_mode: str = "const", **synthesis_kwargs) -> torch.Tensor:
        """The tri-plane features, [N, 3, plane_channels, H, W]."""
        planes = self.backbone.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)
        return planes.view(len(planes), 3, self.plane_channels, planes.shape[-2], planes.shape[-1])

    def synthesis(
        self,
        ws: torch.Tensor,
        c: torch.Tensor,
        neural_rendering_resolution: int | None = None,
        update_emas: bool = False,
        cache_backbone: bool = False,
        use_cached_backbone: bool = False,
        noise_mode: str = "const",
        deterministic: bool | None = None,
        generator: torch.Generator | None = None,
        **synthesis_kwargs,
    ) -> dict[str, torch.Tensor]:
        """Render ``ws`` from cameras ``c`` ([N, 25]: cam2world 4x4 row-major, then normalised intrinsics 3x3).

        Unlike EG3D, passing ``neural_rendering_resolution`` does not change the stored default.
        ``deterministic`` (default: ``rendering_kwargs.get('deterministic', False)``) removes the
        renderer's random sampling; ``generator`` seeds it otherwise.
        """
        if c.ndim != 2 or c.shape[1] < 25:
            raise ValueError(f"c must have shape [N, 25], got {tuple(c.shape)}")
        cam2world = c[:, :16].view(-1, 4, 4)
        intrinsics = c[:, 16:25].view(-1, 3, 3)
        res = int(neural_rendering_resolution or self.neural_rendering_resolution)
        options = self.rendering_kwargs
        if deterministic is not None:
            options = {**options, "deterministic": bool(deterministic)}

        ray_origins, ray_directions = self.ray_sampler(cam2world, intrinsics, res)
        n = ray_origins.shape[0]
        if use_cached_backbone and self._last_planes is not None:
            planes = self._last_planes
        else:
            planes = self.planes(ws, noise_mode=noise_mode, update_emas=update_emas, **synthesis_kwargs)
        if cache_backbone:
            self._last_planes = planes

        features, depth, _ = self.renderer(
            planes, self.decoder, ray_origins, ray_directions, options, generator=generator
        )
        feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], res, res).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, res, res)
        rgb_image = feature_image[:, :3]
        sr_image = self.superresolution(
            rgb_image,
            feature_image,
            ws,
            noise_mode=options["superresolution_noise_mode"],
            update_emas=update_emas,
            **synthesis_kwargs,
        )
        return {"image": sr_image, "image_raw": rgb_image, "image_depth": depth_image}

    def sample(
        self, coordinates, directions, z, c, truncation_psi=1, truncation_cutoff=None, noise_mode="const", **kwargs
    ) -> dict[str, torch.Tensor]:
        """Density and colour features at arbitrary points [N, M, 3] (e.g. for extracting a mesh)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.sample_mixed(coordinates, directions, ws, noise_mode=noise_mode, **kwargs)

    def sample_mixed(self, coordinates, directions, ws, noise_mode="const", **synthesis_kwargs):
        planes = self.planes(ws, noise_mode=noise_mode, **synthesis_kwargs)
        return self.renderer.run_model(
            planes, self.decoder, coordinates, directions, self.rendering_kwargs, deterministic=True
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        neural_rendering_resolution: int | None = None,
        update_emas: bool = False,
        cache_backbone: bool = False,
        use_cached_backbone: bool = False,
        **synthesis_kwargs,
    ) -> dict[str, torch.Tensor]:
        ws = self.mapping(
            z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas
        )
        return self.synthesis(
            ws,
            c,
            neural_rendering_resolution=neural_rendering_resolution,
            update_emas=update_emas,
            cache_backbone=cache_backbone,
            use_cached_backbone=use_cached_backbone,
            **synthesis_kwargs,
        )


# -------------------------------------------------------------------------------------------------
# configs


@dataclass
class TriPlaneConfig:
    """Everything needed to rebuild a `TriPlaneGenerator`; ``to_dict()`` is JSON-serialisable."""

    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    img_resolution: int = 512
    img_channels: int = 3
    sr_num_fp16_res: int = 4
    mapping_kwargs: dict = field(default_factory=lambda: {"num_layers": 2})
    rendering_kwargs: dict = field(default_factory=lambda: ffhq_rendering_kwargs())
    sr_kwargs: dict = field(
        default_factory=lambda: {"channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only"}
    )
    synthesis_kwargs: dict = field(
        default_factory=lambda: {
            "channel_base": 32768,
            "channel_max": 512,
            "fused_modconv_default": "inference_only",
            "num_fp16_res": 0,
            "conv_clamp": None,
        }
    )
    backbone_resolution: int = 256
    plane_channels: int = 32
    decoder_hidden_dim: int = 64
    decoder_output_dim: int = 32
    neural_rendering_resolution: int = 128

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TriPlaneGenerator` (synthesis kwargs flattened like EG3D's)."""
        kwargs = dataclasses.asdict(self)
        synthesis = kwargs.pop("synthesis_kwargs")
        return {**kwargs, **synthesis}

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriPlaneConfig:
        """Accepts this class's dict form or a flat EG3D-style kwargs dict (synthesis kwargs at top level)."""
        data = _plain(dict(data))
        names = {f.name for f in dataclasses.fields(cls)}
        synthesis = dict(data.pop("synthesis_kwargs", {}) or {})
        for key in list(data):
            if key not in names:
                if key in SYNTHESIS_KEYS:
                    synthesis[key] = data.pop(key)
                else:
                    raise ValueError(f"unknown generator config field {key!r}; known: {sorted(names | SYNTHESIS_KEYS)}")
        for key in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
            if key not in data:
                raise ValueError(f"generator config is missing {key!r}")
        return cls(**data, synthesis_kwargs=synthesis)


def ffhq_rendering_kwargs() -> dict[str, Any]:
    """EG3D ``train.py --cfg=ffhq`` rendering options for 512x512 output (generator pose conditioning on).

    The regulariser settings (density_reg*, gpc_reg_prob, reg_type) only matter for training.
    """
    return {
        "image_resolution": 512,
        "disparity_space_sampling": False,
        "clamp_mode": "softplus",
        "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
        "c_gen_conditioning_zero": False,
        "gpc_reg_prob": 0.5,
        "c_scale": 1.0,
        "superresolution_noise_mode": "none",
        "density_reg": 0.25,
        "density_reg_p_dist": 0.004,
        "reg_type": "l1",
        "decoder_lr_mul": 1.0,
        "sr_antialias": True,
        "depth_resolution": 48,
        "depth_resolution_importance": 48,
        "ray_start": 2.25,
        "ray_end": 3.3,
        "box_warp": 1,
        "avg_camera_radius": 2.7,
        "avg_camera_pivot": [0, 0, 0.2],
    }


def eg3d_ffhq512_config(neural_rendering_resolution: int = 128) -> TriPlaneConfig:
    """The official FFHQ-512 generator (``ffhq512-128.pkl``; use 64 for ``ffhq512-64.pkl``)."""
    return TriPlaneConfig(neural_rendering_resolution=neural_rendering_resolution)


def eg3d_small_config() -> TriPlaneConfig:
    """A ~1.55M-parameter EG3D for CPU work: 64x64 tri-planes, 32x32 neural render, 64x64 output.

    Same cameras and scene box as FFHQ (radius 2.7, rays 2.25..3.3, box 1), so the camera helpers apply.
    """
    rendering = ffhq_rendering_kwargs()
    rendering.update(
        image_resolution=64,
        superresolution_module="genfast.SuperresolutionHybrid",
        depth_resolution=24,
        depth_resolution_importance=24,
    )
    return TriPlaneConfig(
        z_dim=128,
        w_dim=128,
        img_resolution=64,
        sr_num_fp16_res=0,
        mapping_kwargs={"num_layers": 2},
        rendering_kwargs=rendering,
        sr_kwargs={"input_resolution": 32, "block_channels": [64, 32], "fused_modconv_default": "inference_only"},
        synthesis_kwargs={
            "channel_base": 4096,
            "channel_max": 128,
            "fused_modconv_default": "inference_only",
            "num_fp16_res": 0,
            "conv_clamp": None,
        },
        backbone_resolution=64,
        plane_channels=16,
        decoder_hidden_dim=32,
        decoder_output_dim=16,
        neural_rendering_resolution=32,
    )


def build_generator(config: TriPlaneConfig | dict[str, Any]) -> TriPlaneGenerator:
    """A randomly initialised generator (in eval mode) from a config or its dict form."""
    if not isinstance(config, TriPlaneConfig):
        config = TriPlaneConfig.from_dict(config)
    return TriPlaneGenerator(**config.init_kwargs()).eval()


def eg3d_ffhq512(checkpoint: str | None = None, neural_rendering_resolution: int = 128) -> TriPlaneGenerator:
    """The official FFHQ-512 EG3D: random weights, or loaded from an EG3D ``.pkl`` / converted folder."""
    if checkpoint is not None:
        from .loader import load_generator

        return load_generator(checkpoint)
    return build_generator(eg3d_ffhq512_config(neural_rendering_resolution))


def parameter_counts(G: TriPlaneGenerator) -> dict[str, int]:
    """Parameters per EG3D sub-network (the split of `FFHQ512_PARAMETER_COUNTS`)."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "backbone.mapping": count(G.backbone.mapping),
        "backbone.synthesis": count(G.backbone.synthesis),
        "decoder": count(G.decoder),
        "superresolution": count(G.superresolution),
        "total": count(G),
    }
