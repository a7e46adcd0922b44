"""FLOPs of one MOCA training step: counted (torch.utils.flop_counter) and analytic.

Both count what FlopCounterMode counts: matrix products (mm/addmm/bmm, the patch convolution) at
2 FLOPs per multiply-add, and attention with PyTorch's flash formulas (forward 4·N²·d per head,
backward 2.5× the forward: it recomputes the scores). LayerNorm, softmax, elementwise work and the
optimiser are not counted. The analytic count is an independent derivation from the config, used
to check the counter (tests) and to show where the FLOPs are.
"""
from __future__ import annotations

from typing import Callable

from torch.utils import flop_counter

from moca_fast.fakegpu.tracker import cpu_attention_flop_formulas


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Runs fn() under FlopCounterMode; returns (total FLOPs, FLOPs per aten op)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_formulas()) as mode:
        fn()
    per_op = {str(op): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return int(mode.get_total_flops()), per_op


def _block_linear(n: int, dim: int, hidden: int) -> int:
    """Forward FLOPs of one pre-norm block's four Linear layers on n tokens of one image."""
    return 2 * n * (4 * dim * dim + 2 * dim * hidden)


def _block_attention(n: int, dim: int) -> int:
    """Forward attention FLOPs (QKᵀ and PV, all heads) on n tokens of one image."""
    return 4 * n * n * dim


def analytic_step_flops(cfg, batch: int) -> dict[str, int]:
    """FLOPs of one training step on `batch` image pairs, by part, and their "total".

    Backward costs 2× the forward for a Linear whose input needs a gradient, 1× when only the
    weight needs one (patch embedding, the generators' first layer and skip), 2.5× for attention.
    """
    B2 = 2 * batch  # student images: cat(view1, view2)
    L, C, K, D = cfg.num_patches, cfg.embed_dim, cfg.num_words, cfg.decoder_embed_dim
    hidden, dec_hidden = int(C * cfg.mlp_ratio), int(D * cfg.mlp_ratio)
    patch = 2 * L * cfg.in_chans * cfg.patch_size**2 * C  # per image, forward

    def encoder_fwd(n):
        return patch + cfg.depth * (_block_linear(n, C, hidden) + _block_attention(n, C))

    parts = {"teacher": B2 * encoder_fwd(1 + L), "teacher_assignment": B2 * 2 * L * C * K}
    student = image_logits = decoder = dense_logits = 0
    for keep, dec in zip(cfg.len_keep(), cfg.len_dec()):
        n = 1 + keep
        student += B2 * (2 * patch + cfg.depth * (3 * _block_linear(n, C, hidden)
                                                  + 3.5 * _block_attention(n, C)))
        image_logits += 3 * 2 * B2 * C * K
        if cfg.loc_weight > 0:
            nd = 1 + dec
            decoder += B2 * (3 * 2 * n * C * D + cfg.decoder_depth * (3 * _block_linear(nd, D, dec_hidden)
                                                                       + 3.5 * _block_attention(nd, D)))
            dense_logits += 3 * 2 * B2 * dec * D * K
    parts.update(student_encoder=int(student), image_logits=image_logits, decoder=int(decoder),
                 dense_logits=dense_logits)

    def generator(out_dim):
        first, second = 2 * K * C * (2 * C), 2 * K * (2 * C) * out_dim
        skip = 0 if out_dim == C else 2 * K * C * out_dim
        return 2 * first + 3 * second + 2 * skip

    parts["generators"] = generator(C) + (generator(D) if cfg.loc_weight > 0 else 0)
    parts["total"] = sum(parts.values())
    return parts
