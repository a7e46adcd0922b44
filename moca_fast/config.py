"""One typed config for model, optimisation, data and run (Config, with its checks), and its loading: preset ->
YAML file -> overrides. The presets are in config_presets, the numeric intervals in config_checks, the parsing of
values in config_parse, the strict YAML reader in config_file; the error type in moca_fast.errors.

Every MOCA hyper-parameter of the paper is a field with the paper's ViT-B/16 default
(valeoai/MOCA main_pretrain.py + moca_vit_base_patch16_dec2). A preset is a named set of
overrides of those defaults; a YAML file or `key=value` strings override further.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moca_fast.config_checks import DATA_FIELDS, check_output_folder, check_ranges
from moca_fast.config_file import read_config_file
from moca_fast.config_parse import apply_overrides
from moca_fast.config_presets import DEFAULT_PRESET, PRESETS, check_preset
from moca_fast.errors import ConfigError


@dataclass
class Config:
    # --- encoder (ViT) ---
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    early_layer: int = 4  # intermediate tokens are taken after block depth-1-early_layer
    # --- decoder (dense loss) ---
    decoder_embed_dim: int = 512
    decoder_depth: int = 2
    decoder_num_heads: int = 16
    # --- online codebook and teacher assignments ---
    num_words: int = 4096
    num_new_words: int = 32  # per step over all ranks; each rank draws num_new_words // world_size
    codebook_sync: str = "rank0"  # "rank0": rank 0 draws, broadcast; "gather": every rank contributes
    inv_delta: float = 10.0
    skip_offset: int = 2
    dist_norm_decay: float = 0.99
    dist_norm_init: float = 0.5
    # --- prediction heads and losses ---
    kappa: float = 3.0
    pred_mlp_ratio: float = 2.0
    mask_ratio: tuple = (0.55, 0.75)
    dec_mask_ratio: tuple = (0.35, 0.55)
    img_weight: float = 0.5
    loc_weight: float = 0.5
    # --- implementation choices ---
    impl: str = "reference"  # "reference" (pure PyTorch) or "fast" (fused kernels, GEMM patch embedding, compile)
    attention: str = "auto"  # "auto", "sdpa", "xformers"
    compile_blocks: str = "auto"  # torch.compile each transformer block: "auto" (with impl=fast on a GPU), "on", "off"
    # compiled blocks: < 1 recomputes cheap ops instead of saving them; 0.8: the LayerNorm and GELU outputs (ViT-B/16
    # batch 256: a predicted 18.4 GiB instead of 27 GiB, bench/estimate.py); 1.0: torch's default partition
    activation_memory_budget: float = 0.8
    # --- optimisation ---
    epochs: int = 200
    batch_size: int = 256  # per GPU (per rank)
    grad_accum: int = 1
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256 unless lr is set
    lr: float | None = None
    warmup_epochs: float = 30.0
    lr_epochs_mul: float = 1.25  # the cosine reaches 0 at lr_epochs_mul * epochs
    weight_decay: float = 0.05
    weight_decay_end: float = 0.20
    lr_wgen: float = 1e-4
    weight_decay_wgen: float = 0.05
    clip_grad: float = 0.1
    momentum_start: float = 0.994
    momentum_cosine: bool = True
    adam_betas: tuple = (0.9, 0.999)
    # 0 (no partitioning: DeepSpeed's bf16 wrapper, fp32 masters; with grad_accum > 1 the gradients sum in bf16), 1, 2
    zero_stage: int = 2
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    seed: int = 0
    # --- data ---
    data: str | None = None  # folder of images (class sub-folders or flat); None: the demo set
    data_backend: str = "auto"  # "auto", "dali", "torch", "synthetic"
    crop_min: float = 0.2
    num_workers: int = 8
    bad_files: str = "skip"  # "skip" (count and log) or "error" (one line naming the file)
    # --- run ---
    output: str = "output"
    max_steps: int | None = None
    log_every: int = 20
    ckpt_every: int = 500  # steps; a final checkpoint is always written
    eval_every: int = 20  # epochs; 0 disables the periodic k-NN
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train: str | None = None  # labelled folders (class sub-folders) for k-NN; None: none (the demo's own)
    knn_val: str | None = None
    keep_checkpoints: int = 2
    # a resume on data other than the checkpoint's: "refuse" (one line saying what changed) or "continue" (train
    # on the new data; the run logs how the epoch length, the schedules and the data order change)
    resume_data_change: str = "refuse"
    cpu_threads: int = 0  # torch intra-op threads per rank; 0: the cores left by the loader's workers and the other ranks

    # ------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def len_keep(self) -> tuple[int, int]:
        """Encoder-visible tokens per masking round (official int(L*(1-r)))."""
        return tuple(int(self.num_patches * (1 - r)) for r in self.mask_ratio)

    def len_dec(self) -> tuple[int, int]:
        """Decoder positions per masking round."""
        return tuple(int(self.num_patches * (1 - r)) for r in self.dec_mask_ratio)

    def words_per_step(self, world_size: int = 1) -> int:
        """New codebook words per step that survive on every rank."""
        per_rank = self.num_new_words // world_size
        return per_rank * world_size if self.codebook_sync == "gather" else per_rank

    def replace(self, **overrides) -> "Config":
        return apply_overrides(self, overrides)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def validate(self, world_size: int = 1) -> "Config":
        """Rejects impossible settings with one clear line (ConfigError)."""
        def fail(msg):
            raise ConfigError(msg)

        check_ranges(self)
        if self.early_layer >= self.depth:
            fail(f"early_layer={self.early_layer} must be in [0, depth={self.depth})")
        if self.img_size % self.patch_size:
            fail(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            fail(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            fail(f"decoder_embed_dim={self.decoder_embed_dim} is not divisible by "
                 f"decoder_num_heads={self.decoder_num_heads}")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            fail("embed_dim and decoder_embed_dim must be multiples of 4 (2-D sin-cos position embedding)")
        L = self.num_patches
        keep, dec = self.len_keep(), self.len_dec()
        for i in range(2):
            if keep[i] < 1:
                fail(f"mask_ratio[{i}]={self.mask_ratio[i]} leaves no visible token of L={L}")
            if self.dec_mask_ratio[i] >= self.mask_ratio[i] or dec[i] <= keep[i]:
                fail(f"dec_mask_ratio[{i}]={self.dec_mask_ratio[i]} must be smaller than "
                     f"mask_ratio[{i}]={self.mask_ratio[i]} and give the decoder more tokens "
                     f"({dec[i]}) than the encoder ({keep[i]})")
        if L - dec[0] < keep[1]:
            fail(f"complementary masks do not fit in L={L}: round 2 needs {keep[1]} tokens outside "
                 f"round 1's {dec[0]} decoder positions, only {L - dec[0]} remain")
        if self.grid_size <= 2 * self.skip_offset:
            fail(f"skip_offset={self.skip_offset} leaves no interior token in a "
                 f"{self.grid_size}x{self.grid_size} grid")
        if self.codebook_sync not in ("rank0", "gather"):
            fail(f"codebook_sync={self.codebook_sync!r} must be 'rank0' or 'gather'")
        if self.num_new_words < world_size:
            fail(f"num_new_words={self.num_new_words} gives no new word per rank with world_size={world_size}")
        per_rank = self.num_new_words // world_size
        if per_rank > self.batch_size:
            fail(f"num_new_words // world_size = {per_rank} new words per rank exceeds the "
                 f"{self.batch_size} images per rank (batch_size)")
        words = self.words_per_step(world_size)
        if self.num_words % words:
            fail(f"num_words={self.num_words} is not a multiple of the {words} words added per step "
                 f"(num_new_words={self.num_new_words}, world_size={world_size}, codebook_sync={self.codebook_sync})")
        if self.impl not in ("reference", "fast"):
            fail(f"impl={self.impl!r} must be 'reference' or 'fast'")
        if self.attention not in ("auto", "sdpa", "xformers"):
            fail(f"attention={self.attention!r} must be 'auto', 'sdpa' or 'xformers'")
        if self.compile_blocks not in ("auto", "on", "off"):
            fail(f"compile_blocks={self.compile_blocks!r} must be 'auto', 'on' or 'off'")
        self.validate_data()
        if self.precision not in ("auto", "bf16", "fp32"):
            fail(f"precision={self.precision!r} must be 'auto', 'bf16' or 'fp32'")
        if self.zero_stage not in (0, 1, 2):
            fail(f"zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.resume_data_change not in ("refuse", "continue"):
            fail(f"resume_data_change={self.resume_data_change!r} must be 'refuse' or 'continue'")
        if self.img_weight + self.loc_weight == 0:
            fail("img_weight and loc_weight are both 0: nothing would be trained")
        if (self.knn_train is None) != (self.knn_val is None):
            fail(f"knn_train={self.knn_train} and knn_val={self.knn_val}: set both (k-NN needs both folders) or neither")
        return self

    def validate_data(self) -> "Config":
        """The data settings alone (what a loader needs, whatever the model)."""
        if self.data_backend not in ("auto", "dali", "torch", "synthetic"):
            raise ConfigError(f"data_backend={self.data_backend!r} must be one of auto, dali, torch, synthetic")
        if self.bad_files not in ("skip", "error"):
            raise ConfigError(f"bad_files={self.bad_files!r} must be 'skip' or 'error'")
        check_ranges(self, DATA_FIELDS)
        return self

    def check_paths(self) -> "Config":
        """The run's folders, before anything starts: data and k-NN folders exist, output can be a folder."""
        for name in ("data", "knn_train", "knn_val"):
            value = getattr(self, name)
            if value is not None and not os.path.isdir(os.path.expanduser(value)):
                raise ConfigError(f"{name}={value}: no such folder")
        check_output_folder(self.output)
        return self


#: the fields that make the encoder's architecture (what an evaluation or an export takes from a checkpoint)
ENCODER_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps")


def check_preset_agrees(preset: str | None, cfg: Config, source: str) -> None:
    """A --preset given beside a checkpoint that records its own architecture must describe that architecture
    (it is not used, so a different one would be silently ignored)."""
    if preset is None:
        return
    expected = load_config(check_preset(preset))
    differing = [f"{name} {getattr(expected, name)} vs {getattr(cfg, name)}" for name in ENCODER_FIELDS
                 if getattr(expected, name) != getattr(cfg, name)]
    if differing:
        raise ConfigError(f"--preset {preset} disagrees with {source} ({', '.join(differing)}); the checkpoint "
                          f"records its architecture: leave out --preset")


def load_config(preset: str | None = None, yaml_path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Preset -> YAML file -> overrides, in that order of precedence (later wins).

    `preset` None: the YAML file's top-level `preset:` key if it has one, else vit_base_dec2; a preset given
    here wins over the file's (as a command-line flag wins over the file). Every problem of the file is one
    ConfigError line naming the file and the line (moca_fast.config_file).
    """
    entries = []
    if yaml_path is not None:
        entries = read_config_file(yaml_path)
    for entry in entries:
        if entry.key == "preset":
            try:
                file_preset = check_preset(entry.value)
            except ConfigError as e:
                raise ConfigError(f"config file {yaml_path}, line {entry.line}: {e}") from None
            preset = preset if preset is not None else file_preset
    cfg = apply_overrides(Config(), PRESETS[check_preset(preset if preset is not None else DEFAULT_PRESET)])
    for entry in entries:
        if entry.key != "preset":
            try:
                cfg = apply_overrides(cfg, {entry.key: entry.value})
            except ConfigError as e:
                raise ConfigError(f"config file {yaml_path}, line {entry.line}: {e}") from None
    return apply_overrides(cfg, overrides or {})


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
