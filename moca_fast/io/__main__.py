"""python -m moca_fast.io import|export — official checkpoint import and timm teacher export.

  import CKPT --preset P [--set key=value ...] [--out model.pt]
      checks and loads an official valeoai/MOCA checkpoint; --out writes it as a moca_fast model file.
  export SRC --out teacher.safetensors|.pth [--preset P] [--set key=value ...]
      writes the teacher encoder in timm layout; SRC is an official checkpoint (needs --preset),
      a moca_fast model file, or a training checkpoint / run folder of launch/train.py (their own
      config is used).
Errors are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moca_fast.config import check_preset_agrees
from moca_fast.config_parse import parse_kv
from moca_fast.config_presets import PRESETS
from moca_fast.output_files import check_output_file


def _parser() -> argparse.ArgumentParser:
    from moca_fast.entry import OneLineParser

    parser = OneLineParser(prog="python -m moca_fast.io", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p, preset_help, required):
        p.add_argument("--preset", choices=sorted(PRESETS), required=required, help=preset_help)
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides for the preset, e.g. kappa=3.0")

    imp = sub.add_parser("import", help="check and load an official MOCA checkpoint (main_pretrain.py)")
    imp.add_argument("checkpoint", help="official checkpoint (.pth with 'model', 'optimizer', 'epoch', 'args')")
    add_model_args(imp, "the moca_fast preset of the checkpoint's architecture", True)
    imp.add_argument("--out", help="write the loaded model as a moca_fast model file here")

    exp = sub.add_parser("export", help="write the teacher encoder in timm VisionTransformer layout")
    exp.add_argument("source", help="official checkpoint (with --preset), moca_fast model file, or a training "
                                    "checkpoint / run folder")
    add_model_args(exp, "preset of an official checkpoint (not used for a moca_fast model file)", False)
    exp.add_argument("--out", required=True, help="output file: .safetensors (metadata) or .pth")
    return parser


def _load(path: str, preset: str | None, overrides: dict):
    """The model of an official checkpoint (with preset and overrides), a model file or a run / checkpoint
    folder (which record their own config: a preset must agree with it, overrides are refused)."""
    from moca_fast.io.native import is_native, load_model
    from moca_fast.io.official import load_official, read_checkpoint

    if Path(path).is_dir() or is_native(read_checkpoint(path)):
        if overrides:
            raise ValueError(f"--set {' '.join(overrides)}: {path} records its own config; --set applies only to "
                             f"an official checkpoint")
        if Path(path).is_dir():
            from moca_fast.io.checkpoints import load_trained_model

            model = load_trained_model(path)[0]
        else:
            model = load_model(path)
        check_preset_agrees(preset, model.config, path)
        return model
    if preset is None:
        raise ValueError(f"{path}: an official checkpoint needs --preset (one of {', '.join(sorted(PRESETS))})")
    return load_official(path, preset, **overrides)


#: what torch.save's C++ file writer says when a write fails (a full disk): a RuntimeError, not an OSError
_TORCH_WRITER_FAILURES = ("inline_container.cc", "PytorchStreamWriter")


def _written(out: str, write):
    """write(), whose write failure (OSError, or torch.save's RuntimeError on a full disk) becomes one line
    naming --out; the file is written atomically, so nothing is left behind. Any other error goes on."""
    try:
        return write()
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(mark in str(e) for mark in _TORCH_WRITER_FAILURES):
            raise
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"--out {out} could not be written ({reason})") from None


def main(argv: list[str] | None = None) -> int:
    from moca_fast.entry import EXIT_BAD_INPUT, first_line, run_main  # stops handled, errors one line from here

    def known(error: Exception) -> tuple[int, str] | None:
        if isinstance(error, (ValueError, OSError)):
            return EXIT_BAD_INPUT, f"error: {first_line(error)}"
        return None

    return run_main(lambda end: _main(argv, end), known=known)


def _main(argv: list[str] | None, end) -> int:
    end.immediate("before the command finished")
    args = _parser().parse_args(argv)
    from moca_fast.io.native import save_model
    from moca_fast.io.official import load_official
    from moca_fast.io.timm_export import export_teacher_timm

    if args.out:
        check_output_file(args.out, "--out")
    overrides = parse_kv(args.set)
    if args.command == "import":
        model = load_official(args.checkpoint, args.preset, **overrides)
        cb = model.codebook
        print(f"loaded {args.checkpoint}: preset {args.preset}, {len(model.state_dict())} tensors, "
              f"codebook {tuple(cb.words.shape)} ptr={int(cb.ptr)} dist_norm={float(cb.dist_norm):.6g} "
              f"dist_norm_prev={float(cb.dist_norm_prev):.6g}")
        if args.out:
            _written(args.out, lambda: save_model(model, args.out))
            print(f"wrote {args.out}")
    else:
        model = _load(args.source, args.preset, overrides)
        name, kwargs = _written(args.out, lambda: export_teacher_timm(model, args.out))
        call = ", ".join([repr(name), "pretrained=False"] + [f"{k}={v!r}" for k, v in kwargs.items()])
        print(f"wrote {args.out}; load with timm.create_model({call}) and strict=True")
    return 0


if __name__ == "__main__":
    sys.exit(main())
