"""EG3D's tri-plane volume renderer: rays, plane sampling, the feature decoder and importance sampling.

Behaviour matches ``training/volumetric_rendering`` and ``OSGDecoder`` of NVlabs/eg3d, including the
plane-orientation quirk of the released checkpoints (see `generate_planes`). One addition:
``rendering_kwargs['deterministic'] = True`` (or ``deterministic=True`` per call) removes the two
sources of randomness of the original renderer - the stratified jitter of the coarse depths and the
random draws of importance sampling - so the same inputs always render the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .networks import FullyConnectedLayer

__all__ = [
    "ImportanceRenderer",
    "MipRayMarcher2",
    "OSGDecoder",
    "RaySampler",
    "generate_planes",
    "project_onto_planes",
    "sample_from_planes",
]


def generate_planes() -> torch.Tensor:
    """The three plane frames, as EG3D's released checkpoints were trained with.

    Each 3x3 matrix holds a plane's axes as rows; a point projects onto a plane as ``p @ inv(M)``
    and keeps the first two coordinates. EG3D intended XY, XZ and ZY planes, but its third matrix
    projects to (z, x), so the planes are effectively XY, XZ and ZX (eg3d issues #30/#53/#67).
    The XZ and ZX planes therefore see the same two axes, transposed, and nothing sees (y, z) alone.
    Fixing it would change which features every point reads, so the checkpoints need the quirk.
    """
    return torch.tensor(
        [
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
            [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        ],
        dtype=torch.float32,
    )


def project_onto_planes(planes: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Project points [N, M, 3] onto each plane: returns [N * n_planes, M, 2] in-plane coordinates."""
    n, m, _ = coordinates.shape
    n_planes = planes.shape[0]
    coordinates = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(n * n_planes, m, 3)
    inv_planes = torch.linalg.inv(planes).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * n_planes, 3, 3)
    return torch.bmm(coordinates, inv_planes)[..., :2]


def sample_from_planes(
    plane_axes: torch.Tensor,
    plane_features: torch.Tensor,
    coordinates: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    box_warp: float = 1.0,
) -> torch.Tensor:
    """Bilinearly read each plane at each point: features [N, 3, C, H, W], points [N, M, 3] -> [N, 3, M, C].

    The tri-plane spans the cube of side ``box_warp`` centred at the origin; outside it features are 0.
    """
    n, n_planes, c, h, w = plane_features.shape
    m = coordinates.shape[1]
    plane_features = plane_features.reshape(n * n_planes, c, h, w)
    coordinates = (2 / box_warp) * coordinates
    grid = project_onto_planes(plane_axes, coordinates).unsqueeze(1)  # [N*3, 1, M, 2]
    out = F.grid_sample(plane_features, grid.float(), mode=mode, padding_mode=padding_mode, align_corners=False)
    return out.permute(0, 3, 2, 1).reshape(n, n_planes, m, c)


class OSGDecoder(nn.Module):
    """Tiny MLP from the mean of the three plane features to (density, 32 colour features)."""

    def __init__(self, n_features: int, options: dict, hidden_dim: int = 64):
        super().__init__()
        self.hidden_dim = hidden_dim
        lr_mul = options.get("decoder_lr_mul", 1)
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr_mul),
            nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + options["decoder_output_dim"], lr_multiplier=lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor) -> dict[str, torch.Tensor]:
        del ray_directions  # EG3D's decoder is view-independent
        x = sampled_features.mean(1)  # aggregate the planes: [N, M, C]
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        # The widened sigmoid lets colours reach exactly 0 and 1 without saturating gradients.
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        sigma = x[..., 0:1]
        return {"rgb": rgb, "sigma": sigma}


class RaySampler(nn.Module):
    """One ray per pixel centre for OpenCV-convention cameras with intrinsics normalised by image size."""

    def forward(
        self, cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = cam2world.shape[0], resolution**2
        device = cam2world.device
        cam_origin = cam2world[:, :3, 3]
        fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
        cx, cy = intrinsics[:, 0, 2], intrinsics[:, 1, 2]
        sk = intrinsics[:, 0, 1]

        # Pixel centres in [0, 1]; rows are image y (down), columns image x (right), row-major order.
        ij = torch.stack(
            torch.meshgrid(
                torch.arange(resolution, dtype=torch.float32, device=device),
                torch.arange(resolution, dtype=torch.float32, device=device),
                indexing="ij",
            )
        ) * (1.0 / resolution) + (0.5 / resolution)
        uv = ij.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(n, 1, 1)
        x_cam = uv[:, :, 0].view(n, -1)
        y_cam = uv[:, :, 1].view(n, -1)
        z_cam = torch.ones((n, m), device=device)

        fx, fy, cx, cy, sk = (t.unsqueeze(-1) for t in (fx, fy, cx, cy, sk))
        x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx * z_cam
        y_lift = (y_cam - cy) / fy * z_cam
        cam_points = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
        world_points = torch.bmm(cam2world, cam_points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
        ray_dirs = F.normalize(world_points - cam_origin[:, None, :], dim=2)
        ray_origins = cam_origin.unsqueeze(1).repeat(1, ray_dirs.shape[1], 1)
        return ray_origins, ray_dirs


class MipRayMarcher2(nn.Module):
    """Alpha compositing between consecutive samples (interval midpoints), as in EG3D/Mip-NeRF."""

    def forward(
        self, colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, rendering_options: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
        densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2

        clamp_mode = rendering_options.get("clamp_mode", "softplus")
        if clamp_mode != "softplus":
            raise ValueError(f"MipRayMarcher2 supports clamp_mode='softplus' only, got {clamp_mode!r}")
        # The -1 shift starts training with nearly empty space.
        densities_mid = F.softplus(densities_mid - 1)

        alpha = 1 - torch.exp(-densities_mid * deltas)
        alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
        weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]

        composite_rgb = torch.sum(weights * colors_mid, -2)
        weight_total = weights.sum(2)
        composite_depth = torch.sum(weights * depths_mid, -2) / weight_total
        # Empty rays divide 0/0; push them to the far end of the sampled range like EG3D.
        composite_depth = torch.nan_to_num(composite_depth, float("inf"))
        composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
        if rendering_options.get("white_back", False):
            composite_rgb = composite_rgb + 1 - weight_total
        return composite_rgb * 2 - 1, composite_depth, weights


class ImportanceRenderer(nn.Module):
    """Coarse stratified samples, then importance samples drawn from the coarse weights, composited together."""

    def __init__(self):
        super().__init__()
        self.ray_marcher = MipRayMarcher2()
        # A plain attribute in EG3D (absent from its state dict): keep it out of ours too.
        self.register_buffer("plane_axes", generate_planes(), persistent=False)

    def forward(
        self,
        planes: torch.Tensor,
        decoder: nn.Module,
        ray_origins: torch.Tensor,
        ray_directions: torch.Tensor,
        rendering_options: dict,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        opts = rendering_options
        deterministic = bool(opts.get("deterministic", False))
        ray_start, ray_end = opts["ray_start"], opts["ray_end"]
        if ray_start == "auto" or ray_end == "auto":
            raise ValueError("ray_start/ray_end 'auto' (ShapeNet's box intersection) is not supported")
        depths_coarse = self.sample_stratified(
            ray_origins,
            ray_start,
            ray_end,
            opts["depth_resolution"],
            opts.get("disparity_space_sampling", False),
            deterministic=deterministic,
            generator=generator,
        )
        colors_coarse, densities_coarse = self._shade(
            planes, decoder, ray_origins, ray_directions, depths_coarse, opts, deterministic, generator
        )

        n_importance = opts.get("depth_resolution_importance", 0)
        if n_importance > 0:
            _, _, weights = self.ray_marcher(colors_coarse, densities_coarse, depths_coarse, opts)
            depths_fine = self.sample_importance(
                depths_coarse, weights, n_importance, deterministic=deterministic, generator=generator
            )
            colors_fine, densities_fine = self._shade(
                planes, decoder, ray_origins, ray_directions, depths_fine, opts, deterministic, generator
            )
            depths, colors, densities = self.unify_samples(
                depths_coarse, colors_coarse, densities_coarse, depths_fine, colors_fine, densities_fine
            )
            rgb, depth, weights = self.ray_marcher(colors, densities, depths, opts)
        else:
            rgb, depth, weights = self.ray_marcher(colors_coarse, densities_coarse, depths_coarse, opts)
        return rgb, depth, weights.sum(2)

    def _shade(self, planes, decoder, ray_origins, ray_directions, depths, opts, deterministic, generator):
        """Decode colour and density at ``origin + depth * direction`` for every sample depth."""
        batch, num_rays, n_samples, _ = depths.shape
        coords = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(batch, -1, 3)
        dirs = ray_directions.unsqueeze(-2).expand(-1, -1, n_samples, -1).reshape(batch, -1, 3)
        out = self.run_model(planes, decoder, coords, dirs, opts, deterministic=deterministic, generator=generator)
        colors = out["rgb"].reshape(batch, num_rays, n_samples, out["rgb"].shape[-1])
        densities = out["sigma"].reshape(batch, num_rays, n_samples, 1)
        return colors, densities

    def run_model(
        self, planes, decoder, sample_coordinates, sample_directions, options, deterministic=False, generator=None
    ) -> dict[str, torch.Tensor]:
        plane_axes = self.plane_axes.to(device=planes.device)
        features = sample_from_planes(
            plane_axes, planes, sample_coordinates, padding_mode="zeros", box_warp=options["box_warp"]
        )
        out = decoder(features, sample_directions)
        noise = options.get("density_noise", 0)
        if noise > 0 and not deterministic:  # a training-time regulariser of EG3D
            sigma = out["sigma"]
            out["sigma"] = sigma + torch.randn(sigma.shape, generator=generator, device=sigma.device) * noise
        return out

    @staticmethod
    def unify_samples(depths1, colors1, densities1, depths2, colors2, densities2):
        """Merge coarse and fine samples and sort them by depth along each ray."""
        depths = torch.cat([depths1, depths2], dim=-2)
        colors = torch.cat([colors1, colors2], dim=-2)
        densities = torch.cat([densities1, densities2], dim=-2)
        _, order = torch.sort(depths, dim=-2)
        depths = torch.gather(depths, -2, order)
        colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
        densities = torch.gather(densities, -2, order.expand(-1, -1, -1, 1))
        return depths, colors, densities

    @staticmethod
    def sample_stratified(
        ray_origins: torch.Tensor,
        ray_start: float,
        ray_end: float,
        depth_resolution: int,
        disparity_space_sampling: bool = False,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``depth_resolution`` evenly spaced depths per ray, each jittered by up to one spacing (unless deterministic).

        Like EG3D, the spacing is (end - start) / (n - 1), so jittered samples reach up to one spacing past
        ``ray_end``; without jitter the samples are exactly ``linspace(start, end, n)``.
        """
        n, m, _ = ray_origins.shape
        device = ray_origins.device
        if disparity_space_sampling:  # evenly spaced in 1/depth
            t = torch.linspace(0, 1, depth_resolution, device=device).reshape(1, 1, depth_resolution, 1)
            t = t.repeat(n, m, 1, 1)
            if not deterministic:
                t = t + torch.rand(t.shape, generator=generator, device=device) * (1 / (depth_resolution - 1))
            return 1.0 / (1.0 / ray_start * (1.0 - t) + 1.0 / ray_end * t)
        depths = torch.linspace(ray_start, ray_end, depth_resolution, device=device)
        depths = depths.reshape(1, 1, depth_resolution, 1).repeat(n, m, 1, 1)
        if not deterministic:
            delta = (ray_end - ray_start) / (depth_resolution - 1)
            depths = depths + torch.rand(depths.shape, generator=generator, device=device) * delta
        return depths

    def sample_importance(
        self,
        z_vals: torch.Tensor,
        weights: torch.Tensor,
        n_importance: int,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``n_importance`` depths per ray from the (smoothed) coarse compositing weights."""
        with torch.no_grad():
            batch, num_rays, n_samples, _ = z_vals.shape
            z_vals = z_vals.reshape(batch * num_rays, n_samples)
            weights = weights.reshape(batch * num_rays, -1)  # one fewer than z_vals (interval midpoints)
            # Smooth with a max-then-average over neighbours so thin surfaces still attract samples.
            weights = F.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
            weights = F.avg_pool1d(weights, 2, 1).squeeze(1)
            weights = weights + 0.01
            z_mid = 0.5 * (z_vals[:, :-1] + z_vals[:, 1:])
            # EG3D pairs the midpoints with weights[:, 1:-1] (shorter than the bins); kept for fidelity.
            samples = self.sample_pdf(z_mid, weights[:, 1:-1], n_importance, deterministic, generator=generator)
        return samples.detach().reshape(batch, num_rays, n_importance, 1)

    @staticmethod
    def sample_pdf(
        bins: torch.Tensor,
        weights: torch.Tensor,
        n_importance: int,
        deterministic: bool = False,
        eps: float = 1e-5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Inverse-CDF sampling of a piecewise-constant pdf over ``bins``.

        Deterministic mode reads the inverse CDF at the quantile midpoints (i + 0.5) / n instead of at
        uniform random numbers: the same number of samples, placed where the random ones land on average.
        """
        n_rays, n_bins = weights.shape
        weights = weights + eps
        pdf = weights / torch.sum(weights, -1, keepdim=True)
        cdf = torch.cumsum(pdf, -1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
        if deterministic:
            u = (torch.arange(n_importance, device=bins.device, dtype=cdf.dtype) + 0.5) / n_importance
            u = u.expand(n_rays, n_importance)
        else:
            u = torch.rand(n_rays, n_importance, generator=generator, device=bins.device)
        u = u.contiguous()
        inds = torch.searchsorted(cdf, u, right=True)
        below = torch.clamp_min(inds - 1, 0)
        above = torch.clamp_max(inds, n_bins)
        inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_importance)
        cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_importance, 2)
        bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_importance, 2)
        denom = cdf_g[..., 1] - cdf_g[..., 0]
        denom = torch.where(denom < eps, torch.ones_like(denom), denom)  # zero-weight bins are never picked
        return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])
