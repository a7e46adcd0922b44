"""MOCA: student encoder, EMA teacher, online codebook, prototype generators, dense decoder, losses."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from moca_fast.config import Config, load_config
from moca_fast.distributed import rank_and_world
from moca_fast.model.attention import resolve_backend
from moca_fast.model.codebook import OnlineCodebook
from moca_fast.model.heads import DenseDecoder, PrototypeGenerator
from moca_fast.model.losses import dense_loss, image_loss, teacher_targets
from moca_fast.model.masks import make_two_complementary_masks
from moca_fast.model.vit import ViTEncoder

log = logging.getLogger(__name__)


class MOCA(nn.Module):
    """The MOCA pretraining model; `forward` returns the weighted loss of one (micro-)step."""

    #: parameter-name prefixes of the two prototype generators (their own constant lr / wd)
    GENERATOR_PREFIXES = ("img_generator.", "dense_generator.")

    def __init__(self, cfg: Config, world_size: int | None = None):
        super().__init__()
        self.config = cfg.validate(world_size or rank_and_world()[1])
        vit_args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                        mlp_ratio=cfg.mlp_ratio, eps=cfg.norm_eps)
        self.encoder = ViTEncoder(**vit_args)
        self.teacher = ViTEncoder(**vit_args)
        self.codebook = OnlineCodebook(cfg.num_words, cfg.embed_dim, cfg.grid_size, cfg.num_new_words,
                                       cfg.skip_offset, cfg.inv_delta, cfg.dist_norm_decay, cfg.dist_norm_init,
                                       cfg.codebook_sync)
        hidden = int(cfg.embed_dim * cfg.pred_mlp_ratio)
        self.img_generator = PrototypeGenerator(cfg.embed_dim, hidden, cfg.embed_dim)
        self.use_dense_loss = cfg.loc_weight > 0
        if self.use_dense_loss:
            self.dense_generator = PrototypeGenerator(cfg.embed_dim, hidden, cfg.decoder_embed_dim)
            self.decoder = DenseDecoder(cfg.embed_dim, cfg.decoder_embed_dim, cfg.decoder_depth,
                                        cfg.decoder_num_heads, cfg.mlp_ratio, cfg.grid_size, cfg.norm_eps)
        self.register_buffer("kappa", torch.tensor(float(cfg.kappa)))
        self.intermediate_block = cfg.depth - 1 - cfg.early_layer
        self._init_weights()
        self.teacher.load_state_dict(self.encoder.state_dict())
        self.teacher.requires_grad_(False)
        self.attention_backend = resolve_backend(cfg.attention)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = self.attention_backend

    def _init_weights(self) -> None:
        self.encoder.init_weights()
        for m in self.modules():
            if isinstance(m, nn.Linear) and not any(m is e for e in self.encoder.modules()):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.use_dense_loss:
            nn.init.normal_(self.decoder.mask_token, std=0.02)

    # ------------------------------------------------------------------ teacher
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θt ← m·θt + (1−m)·θs, accumulated in the teacher's fp32 weights."""
        if momentum >= 1.0:
            return
        pairs = [(t, s) for t, s in zip(self.teacher.parameters(), self.encoder.parameters()) if s.requires_grad]
        teacher = [t for t, _ in pairs]
        student = [s.detach().to(t.dtype) for t, s in pairs]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    @torch.no_grad()
    def teacher_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher final patch tokens: x [B, 3, H, W] -> [B, L, C] fp32.

        The teacher keeps fp32 weights; a low-precision x runs it under autocast of that dtype, an fp32 x
        under whatever autocast the caller set. Its residual stream is fp32 (the fp32 position embedding
        promotes the patch embedding's output), so the tokens are the final LayerNorm's fp32 output, as in
        the official code, and the assignment and the codebook update take them so. Rounding them to bf16
        first, as this code did before issue 10, is harmless by these figures (bf16 vs fp32 tokens, CPU,
        `assign_reference`): a demo model trained 400 fp32 steps (loss
        5.86 -> 0.98), 64 images, K = 256: codes max |diff| 1.8e-3, argmax agreement 99.5 %, mean
        KL(fp32 || bf16) 8.4e-7 (max 1.1e-5), bow max |diff| 1.2e-4, new words' cosine >= 0.999998; for
        scale, this bf16-autocast teacher against an fp32 one: KL 2.2e-6, argmax agreement 99.3 %.
        ViT-B-sized clustered random tokens (32 images, 196 tokens, C = 768, K = 4096): codes max |diff|
        7.2e-4, argmax agreement 99.8 %, mean KL 3.0e-7. The speed it could save (half the token bytes
        read by the assignment and the dense loss) is unmeasured, so fp32 stays.
        """
        if x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(x.device.type, dtype=x.dtype):
                _, final = self.teacher(x)
        else:
            _, final = self.teacher(x)
        return final[:, 1:]

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher [AVG] embedding for evaluation: [B, 3, H, W] -> [B, C] fp32."""
        return self.teacher_tokens(x).mean(dim=1)

    # ------------------------------------------------------------------ step
    def sample_masks(self, n: int, device) -> list[torch.Tensor]:
        cfg = self.config
        return make_two_complementary_masks(n, cfg.num_patches, cfg.len_keep(), cfg.len_dec(), device)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, momentum: float, masks: list[torch.Tensor] | None = None,
                update_teacher: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One MOCA (micro-)step on two views x1, x2 [B, 3, H, W].

        masks: two ids_shuffle LongTensors [2B, L] (official representation), or None to sample.
        update_teacher=False skips the EMA and the codebook update (gradient-accumulation micro-steps).
        Returns (img_weight * L_img + loc_weight * L_loc, {"img", "loc"} detached 0-dim tensors).
        """
        cfg = self.config
        if update_teacher and self.training:
            self.update_teacher(momentum)
        words = self.codebook.words.clone()
        tokens1, tokens2 = self.teacher_tokens(x1), self.teacher_tokens(x2)
        products = x1.dtype if x1.dtype in (torch.bfloat16, torch.float16) else None  # the teacher's autocast
        targets, stats = teacher_targets(tokens1, tokens2, words, self.codebook.inv_temperature(),
                                         self.codebook.interior, cfg.impl, products)
        if self.training:
            self.codebook.update_dist_norm(torch.stack(stats))
            if update_teacher:
                self.codebook.step((tokens1, tokens2)[self.codebook.draw_view()])
        del tokens1, tokens2  # not needed past here (the fused path keeps its own copy): 2B·L·C fp32 less at the peak

        x = torch.cat([x1, x2])
        if masks is None:
            masks = self.sample_masks(x.shape[0], x.device)
        kappa = float(cfg.kappa)
        img_protos = self.img_generator(words.to(self.img_generator.mlp[0].weight.dtype))
        if self.use_dense_loss:
            dense_protos = self.dense_generator(words.to(self.dense_generator.mlp[0].weight.dtype))
        loss_img = loss_loc = x.new_zeros((), dtype=torch.float32)
        for ids_shuffle, len_keep, len_dec in zip(masks, cfg.len_keep(), cfg.len_dec()):
            intermediate, final = self.encoder(x, ids_shuffle[:, :len_keep], self.intermediate_block)
            avg = final[:, 1:].mean(dim=1)
            loss_img = loss_img + image_loss(avg, img_protos, kappa, targets, cfg.impl)
            if self.use_dense_loss:
                dec = self.decoder(avg, intermediate, ids_shuffle, len_dec)
                loss_loc = loss_loc + dense_loss(dec, dense_protos, kappa, targets, ids_shuffle[:, :len_dec],
                                                 cfg.impl)
        loss = loss_img * cfg.img_weight + loss_loc * cfg.loc_weight
        return loss, {"img": loss_img.detach(), "loc": loss_loc.detach()}


def build_model(preset: str = "vit_base_dec2", world_size: int | None = None, **overrides) -> MOCA:
    """MOCA of a preset with Config-field overrides, e.g. build_model("tiny", impl="reference")."""
    return MOCA(load_config(preset, overrides=overrides), world_size)
