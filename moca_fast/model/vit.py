"""ViT encoder with MAE-style masked forward, and the transformer block shared with the decoder.

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm) so the teacher exports to timm by a plain copy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moca_fast.model.attention import attention


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / MoCo v3 layout): [1 + G*G, dim], [CLS] row zeros."""
    assert dim % 4 == 0

    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    emb = np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm Block without layer-scale / drop-path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> [B, L, C]."""
        return self.proj(x).flatten(2).transpose(1, 2)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [B, L, C], ids: [B, n] -> [B, n, C]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ViTEncoder(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def init_weights(self) -> None:
        """Xavier-uniform Linear (patch conv weight as a Linear), zero Linear biases, LayerNorm 1/0, [CLS]
        N(0, 0.02). The patch conv's bias keeps nn.Conv2d's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        as in the official code (DESIGN §1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None,
                intermediate_block: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Runs the encoder on all tokens, or only on the visible ones.

        x: [B, 3, H, W]; keep_ids: [B, n] visible patch indices (None: all L).
        Returns (tokens after block `intermediate_block` (0-based) before any norm, or None;
        final tokens after the final LayerNorm), each [B, 1 + n, C] with [CLS] first.
        """
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        if keep_ids is not None:
            x = gather_tokens(x, keep_ids)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        intermediate = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == intermediate_block:
                intermediate = x
        x = self.norm(x)
        if intermediate_block == len(self.blocks) - 1:  # early_layer 0: the official code returns the normed tokens
            intermediate = x
        return intermediate, x
