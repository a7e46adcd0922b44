"""The data scan as its own command, to run ahead of training (the trainer reuses its verdicts).

    python -m moca_fast.data scan /data/imagenet/train               # all cores of this machine
    python -m moca_fast.data scan /data/imagenet/train --processes 8

Lists the folder, checks every new or changed file (see moca_fast.data.scan) with a progress bar (or a
log line every 15 s when stderr is not a terminal) and prints one summary line. Stopped (Ctrl-C, SIGTERM,
SIGHUP: one line, moca_fast.ending), it keeps what it checked and the same command resumes. Exit status:
0 done, 2 bad folder or bad file with --bad-files error, 1 an unexpected error (one line, the traceback in a
file), 128 + N stopped by signal N.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from moca_fast.entry import EXIT_BAD_INPUT, first_line, run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moca_fast.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    s = commands.add_parser("scan", help="list and check the images of a folder, keeping the verdicts")
    s.add_argument("folder", help="image folder: class sub-folders (ImageNet train layout) or flat")
    s.add_argument("--processes", type=int, default=None, help="worker processes (default: the usable cores)")
    s.add_argument("--bad-files", choices=("skip", "error"), default="skip",
                   help="skip (default: count and list them) or error (stop at the first)")
    return p.parse_args(argv)


def summary(images, stats: dict, seconds: float) -> str:
    from moca_fast.data.scan import printable
    from moca_fast.data.scan_pool import format_duration

    bad = len(images.skipped)
    checked = stats["checked"]
    rate = f" ({checked / stats['check_s']:,.0f} files/s on {stats['processes']} processes)" if checked else ""
    return (f"{printable(images.root)}: {len(images):,} images in {len(images.classes):,} classes, "
            f"{bad:,} bad file{'' if bad == 1 else 's'} skipped, {len(images.ignored):,} other entries not used; "
            f"checked {checked:,} files{rate}, {stats['cached']:,} verdicts reused, in {format_duration(seconds)}; "
            f"verdicts in {printable(stats['cache'])}")


def main(argv=None) -> int:
    return run_main(lambda end: _main(argv, end), known=_known_error)


def _known_error(error: Exception) -> tuple[int, str] | None:
    from moca_fast.errors import ConfigError

    return (EXIT_BAD_INPUT, f"error: {first_line(error)}") if isinstance(error, ConfigError) else None


def _main(argv, end) -> int:
    end.immediate("during the scan: the files checked so far are kept; the same command resumes")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from moca_fast.data.scan import scan_images

    stats: dict = {}
    started = time.monotonic()
    images = scan_images(args.folder, args.bad_files, processes=args.processes, stats=stats)
    print(summary(images, stats, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
