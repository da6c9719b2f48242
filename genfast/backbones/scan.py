"""The selective scan (Mamba's S6 recurrence) behind one switch, so SS2D runs anywhere.

For every channel d and state n, with dt = softplus(delta + delta_bias)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        y_t = <C_t, h_t> + D * u_t

Backends (the `backend` argument, or a model's `scan_backend` config field):

- ``"parallel"``: pure PyTorch, the default. The recurrence h_t = a_t h_{t-1} + b_t is solved by a
  chunked scan: the sequence is cut into chunks of `chunk` steps that all advance together (one
  vectorised step per position in the chunk), the chunk-end states are scanned the same way
  (recursively), and each chunk adds its entering state, decayed. O(L) work in
  about chunk * log_chunk(L) vectorised steps. Its backward is the same scan run backwards in time
  (a custom autograd Function), so training keeps only a and h, not the intermediate steps.
- ``"sequential"``: a plain loop over time with ordinary autograd; the reference the others are
  tested against. Slow to train on (one autograd node per step).
- ``"mamba_ssm"``: ``mamba_ssm``'s fused CUDA kernel (``pip install mamba-ssm``), CUDA tensors only.
- ``"auto"``: ``mamba_ssm`` when it is installed and the tensors are on CUDA, else ``"parallel"``.

Why the parallel scan is numerically safe: it works on the decays a = exp(dt * A) themselves, which
lie in (0, 1] because dt >= 0 and A < 0. Combining two steps only multiplies decays (products stay
in [0, 1]; at worst they underflow to 0, the true limit) and adds a * h terms that are bounded by the
state itself. Nothing is ever exponentiated from a cumulative sum, so unlike log-space cumsum scans
(which need exp(-cumsum), overflowing float32 once a chunk's total decay passes ~88 nats and so
needing small chunks or clamps) no chunk size, sequence length or decay rate can produce inf/NaN.
The arithmetic is the sequential recurrence's, regrouped by chunk, so its rounding is of the same order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "parallel", "sequential", "mamba_ssm")
DEFAULT_CHUNK = 8  # fastest of 8..128 on CPU for L = 256..16384, d_state 1 and 16
_INSTALL_HINT = (
    "scan_backend='mamba_ssm' needs the mamba-ssm package (its fused CUDA selective scan): "
    "`pip install mamba-ssm` on a machine with CUDA, or use scan_backend='parallel' (pure PyTorch, "
    "runs anywhere) or 'auto' (mamba-ssm when installed and on CUDA, else parallel)"
)


@functools.lru_cache(maxsize=1)
def _mamba_scan_fn():
    """mamba_ssm's selective_scan_fn, or None when the package (or its compiled kernel) is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's CUDA selective scan can be imported here."""
    return _mamba_scan_fn() is not None


def check_backend(name: str) -> str:
    """Validate a backend name; asking for mamba_ssm where it is not installed is an ImportError."""
    if name not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name == "mamba_ssm" and not mamba_ssm_available():
        raise ImportError(_INSTALL_HINT)
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend a call on `device` actually uses ("auto" resolved)."""
    check_backend(name)
    if name == "auto":
        return "mamba_ssm" if device.type == "cuda" and mamba_ssm_available() else "parallel"
    if name == "mamba_ssm" and device.type != "cuda":
        raise RuntimeError(
            f"scan_backend='mamba_ssm' runs on CUDA tensors only, got {device.type} tensors: move the "
            f"model to a GPU, or use scan_backend='parallel' / 'auto'"
        )
    return name


# ---------------------------------------------------------------------------------------------
# h_t = a_t * h_{t-1} + b_t along the last dimension (h_{-1} = 0)
# ---------------------------------------------------------------------------------------------


def _chunk_steps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place along dim 0: a becomes the cumulative decay and b the state, from a zero start."""
    for t in range(1, a.shape[0]):
        b[t].addcmul_(a[t], b[t - 1])
        a[t].mul_(a[t - 1])
    return a, b


def _chunked_scan(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """The state h at every step of the last dim. All chunks advance together, each from a zero
    state; the states at the chunk ends are then scanned the same way (recursively) to give the
    state entering each chunk, whose decayed value is added to the chunk's own states."""
    length = a.shape[-1]
    if length <= chunk:
        return _chunk_steps(a.movedim(-1, 0).clone(), b.movedim(-1, 0).clone())[1].movedim(0, -1)
    pad = (-length) % chunk
    if pad:  # a=1, b=0 steps at the end change nothing before them
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    # (chunk, ..., n_chunks): the step within a chunk leads, so each step is one contiguous slice
    a = a.unflatten(-1, (-1, chunk)).movedim(-1, 0).clone()
    b = b.unflatten(-1, (-1, chunk)).movedim(-1, 0).clone()
    decay, local = _chunk_steps(a, b)
    ends = _chunked_scan(decay[-1], local[-1], chunk)
    entering = F.pad(ends[..., :-1], (1, 0))
    h = local.addcmul_(decay, entering)
    return h.movedim(0, -1).flatten(-2)[..., :length]


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b); the backward is the same recurrence run backwards in time:
    g_t = dL/dh_t + a_{t+1} g_{t+1},  dL/db_t = g_t,  dL/da_t = g_t * h_{t-1}."""

    @staticmethod
    def forward(ctx, a, b, chunk):
        h = _chunked_scan(a, b, chunk)
        ctx.save_for_backward(a, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[..., 1:], (0, 1))
        g = _chunked_scan(a_next.flip(-1), grad_h.flip(-1), ctx.chunk).flip(-1)
        grad_a = g * F.pad(h[..., :-1], (1, 0)) if ctx.needs_input_grad[0] else None
        return grad_a, g, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along the last dim with the parallel scan.

    a and b broadcast to one shape; |a| <= 1 keeps every intermediate bounded (see module doc).
    """
    if chunk < 2:
        raise ValueError(f"chunk must be at least 2, got {chunk}")
    a, b = torch.broadcast_tensors(a, b)
    return _LinearScan.apply(a.contiguous(), b.contiguous(), chunk)


def _sequential_states(a: torch.Tensor, b: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """Reference loop over the last dim: sum over the state dim (-2) of readout_t * h_t, plain autograd."""
    h = torch.zeros_like(b[..., 0])
    out = []
    for t in range(b.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append((h * readout[..., t]).sum(-1))
    return torch.stack(out, dim=-1)


# ---------------------------------------------------------------------------------------------
# The selective scan, with mamba_ssm's selective_scan_fn signature
# ---------------------------------------------------------------------------------------------


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    backend: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Mamba's selective scan; output (batch, dim, length) in float32 (float64 for float64 input).

    u, delta: (batch, dim, length); A: (dim, d_state), negative; B, C: (batch, groups, d_state, length)
    or (batch, d_state, length), channel d reading group d // (dim // groups) as in mamba-ssm;
    D, delta_bias: (dim,). Half-precision inputs are scanned in float32, as the official SS2D does.
    """
    backend = resolve_backend(backend, u.device)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    if dim % groups:
        raise ValueError(f"dim {dim} is not divisible by the {groups} groups of B and C")
    dtype = torch.promote_types(u.dtype, torch.float32)  # half inputs scan in float32; float64 stays
    cast = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias)]
    u, delta, A, B, C, D, delta_bias = cast

    if backend == "mamba_ssm":
        fn = _mamba_scan_fn()
        return fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D, delta_bias=delta_bias, delta_softplus=delta_softplus,
        )

    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # (batch, groups, dim/groups, d_state, length): channels of a group share its B and C
    shape = (batch, groups, dim // groups, length)
    dt = delta.reshape(shape).unsqueeze(-2)
    decay = torch.exp(dt * A.view(groups, dim // groups, d_state, 1))  # in (0, 1]
    drive = dt * u.reshape(shape).unsqueeze(-2) * B.unsqueeze(2)
    C = C.unsqueeze(2)
    if backend == "sequential":
        y = _sequential_states(decay, drive, C)
    else:
        y = (linear_scan(decay, drive, chunk) * C).sum(-2)
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = y + D[:, None] * u
    return y
