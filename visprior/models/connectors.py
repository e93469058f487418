"""Connectors: map vision-tower patch features `[N, P, D_vis]` to LM input embeddings `[N, K, D_lm]`.

MM1 found the number of image tokens K matters more than the connector's type, so every connector here takes K as
`num_tokens` (None = one token per patch). Per-token projectors (linear, mlp2x_gelu) reduce K by space-to-depth (concat
r x r neighbouring patches, as Idefics3 / nanoVLM do); the poolers reduce it by pooling. Grid-based connectors need a square
patch grid and a square K.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConnectorSpec:
    """Which connector and how many image tokens it emits per image."""

    name: str = "mlp2x_gelu"
    """One of `CONNECTORS`: linear, mlp2x_gelu, avg_pool, attention_pool, c_abstractor."""
    num_tokens: int | None = None
    """Image tokens per image; None keeps one per patch."""
    options: dict[str, Any] = field(default_factory=dict)
    """Connector-specific keyword arguments (e.g. `num_heads` for attention_pool, `depth` for c_abstractor)."""


def _grid_side(num_patches: int, name: str) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{name} needs a square patch grid, got {num_patches} patches (a CLS token kept by select='cls_patch'?)"
        )
    return side


def _token_side(num_tokens: int, name: str) -> int:
    side = math.isqrt(num_tokens)
    if num_tokens < 1 or side * side != num_tokens:
        raise ValueError(f"{name} pools the patch grid to a square; num_tokens={num_tokens} is not a perfect square")
    return side


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class _PerToken(nn.Module):
    """Shared by linear and mlp2x_gelu: optional space-to-depth to reach `num_tokens`, then a per-token projection."""

    name = ""

    def __init__(self, in_dim: int, out_dim: int, num_patches: int, num_tokens: int | None = None) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.num_tokens = num_tokens or num_patches
        self.ratio = 1
        if self.num_tokens != num_patches:
            grid = _grid_side(num_patches, self.name)
            side = _token_side(self.num_tokens, self.name)
            if grid % side:
                raise ValueError(
                    f"{self.name} reduces tokens by merging r x r patches: num_tokens={self.num_tokens} needs a side dividing "
                    f"the {grid}x{grid} patch grid (e.g. {', '.join(str((grid // r) ** 2) for r in (1, 2, 4) if grid % r == 0)})"
                )
            self.ratio = grid // side
        self.proj = self._projection(in_dim * self.ratio**2, out_dim)

    def _projection(self, in_dim: int, out_dim: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, P, D_in]` -> `[N, K, D_out]`."""
        if self.ratio > 1:
            n, p, d = features.shape
            grid, r = math.isqrt(p), self.ratio
            x = features.view(n, grid // r, r, grid // r, r, d)  # [N, g/r, r, g/r, r, D]
            features = x.permute(0, 1, 3, 2, 4, 5).reshape(n, self.num_tokens, r * r * d)  # [N, K, r²D]
        return self.proj(features)  # [N, K, D_out]


class Linear(_PerToken):
    """One linear map per token (LLaVA-1.0)."""

    name = "linear"

    def _projection(self, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim)


class MLP2xGELU(_PerToken):
    """LLaVA-1.5's `mlp2x_gelu` projector per token."""

    name = "mlp2x_gelu"

    def _projection(self, in_dim: int, out_dim: int) -> nn.Module:
        return mlp2x_gelu(in_dim, out_dim)


class AvgPool(nn.Module):
    """Adaptive average pooling of the patch grid to sqrt(K) x sqrt(K), then a projector (MM1's average pooling)."""

    def __init__(
        self, in_dim: int, out_dim: int, num_patches: int, num_tokens: int | None = None, projector: str = "mlp2x_gelu"
    ) -> None:
        super().__init__()
        self.grid = _grid_side(num_patches, "avg_pool")
        self.num_tokens = num_tokens or num_patches
        self.side = _token_side(self.num_tokens, "avg_pool")
        if self.side > self.grid:
            raise ValueError(f"avg_pool cannot make {self.num_tokens} tokens from {num_patches} patches")
        if projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"avg_pool projector must be 'linear' or 'mlp2x_gelu', got {projector!r}")
        self.proj = nn.Linear(in_dim, out_dim) if projector == "linear" else mlp2x_gelu(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, P, D_in]` -> `[N, K, D_out]`."""
        n, _, d = features.shape
        grid = features.transpose(1, 2).reshape(n, d, self.grid, self.grid)  # [N, D, g, g]
        pooled = F.adaptive_avg_pool2d(grid, self.side)  # [N, D, s, s]
        return self.proj(pooled.flatten(2).transpose(1, 2))  # [N, K, D_out]


class AttentionPool(nn.Module):
    """K learned queries cross-attend to the patches (a one-layer perceiver resampler / Q-Former-lite), then a projector."""

    def __init__(
        self, in_dim: int, out_dim: int, num_patches: int, num_tokens: int | None = None, num_heads: int = 8
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens or num_patches
        if self.num_tokens < 1:
            raise ValueError(f"attention_pool needs num_tokens >= 1, got {self.num_tokens}")
        if in_dim % num_heads:
            raise ValueError(f"attention_pool: num_heads={num_heads} must divide the vision hidden size {in_dim}")
        self.queries = nn.Parameter(torch.randn(self.num_tokens, in_dim) * in_dim**-0.5)  # [K, D_in]
        self.norm_kv = nn.LayerNorm(in_dim)
        self.norm_q = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(in_dim)
        self.proj = mlp2x_gelu(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, P, D_in]` -> `[N, K, D_out]`."""
        kv = self.norm_kv(features)  # [N, P, D_in]
        q = self.norm_q(self.queries).unsqueeze(0).expand(features.size(0), -1, -1)  # [N, K, D_in]
        pooled, _ = self.attn(q, kv, kv, need_weights=False)  # [N, K, D_in]
        return self.proj(self.norm_out(pooled + q))  # [N, K, D_out]


class _ResBlock(nn.Module):
    """Pre-norm residual conv block: GroupNorm -> SiLU -> 3x3 conv, twice (a plain stand-in for Honeybee's RegNet stage)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        groups = math.gcd(32, dim)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.GroupNorm(groups, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # [N, C, H, W]


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor (used by MM1): conv blocks, adaptive average pooling to sqrt(K)², conv blocks, MLP readout.

    Convolutions keep local context that plain pooling loses; a learned position embedding is added to the patches first.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        num_tokens: int | None = None,
        hidden_dim: int | None = None,
        depth: int = 3,
    ) -> None:
        super().__init__()
        self.grid = _grid_side(num_patches, "c_abstractor")
        self.num_tokens = num_tokens or num_patches
        self.side = _token_side(self.num_tokens, "c_abstractor")
        if self.side > self.grid:
            raise ValueError(f"c_abstractor cannot make {self.num_tokens} tokens from {num_patches} patches")
        hidden_dim = hidden_dim or out_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, in_dim))  # [1, P, D_in]
        self.stem = nn.Conv2d(in_dim, hidden_dim, 1)
        self.stage1 = nn.Sequential(*[_ResBlock(hidden_dim) for _ in range(depth)])
        self.stage2 = nn.Sequential(*[_ResBlock(hidden_dim) for _ in range(depth)])
        self.readout = mlp2x_gelu(hidden_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, P, D_in]` -> `[N, K, D_out]`."""
        n, _, d = features.shape
        x = (features + self.pos_embed).transpose(1, 2).reshape(n, d, self.grid, self.grid)  # [N, D_in, g, g]
        x = self.stage1(self.stem(x))  # [N, H, g, g]
        x = self.stage2(F.adaptive_avg_pool2d(x, self.side))  # [N, H, s, s]
        return self.readout(x.flatten(2).transpose(1, 2))  # [N, K, D_out]


CONNECTORS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGELU,
    "avg_pool": AvgPool,
    "attention_pool": AttentionPool,
    "c_abstractor": CAbstractor,
}


def build_connector(spec: ConnectorSpec, in_dim: int, out_dim: int, num_patches: int) -> nn.Module:
    """Instantiate `spec.name`; the module's `num_tokens` attribute is the image-token count it emits per image."""
    if spec.name not in CONNECTORS:
        raise ValueError(f"unknown connector {spec.name!r}; choose one of {sorted(CONNECTORS)}")
    cls = CONNECTORS[spec.name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "in_dim",
        "out_dim",
        "num_patches",
        "num_tokens",
    }
    unknown = set(spec.options) - allowed
    if unknown:
        raise ValueError(
            f"connector {spec.name!r} has no option(s) {sorted(unknown)}; it takes {sorted(allowed) or 'none'}"
        )
    return cls(in_dim, out_dim, num_patches, spec.num_tokens, **spec.options)
