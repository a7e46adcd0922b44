"""The data scan as its own command, to run ahead of training (the trainer reuses its verdicts).

    python -m moca_fast.data scan /data/imagenet/train               # all cores of this machine
    python -m moca_fast.data scan /data/imagenet/train --processes 8

Lists the folder, checks every new or changed file (see moca_fast.data.scan) with a progress bar (or a
log line every 15 s when stderr is not a terminal) and prints one summary line. Interrupted (Ctrl-C,
SIGTERM, SIGHUP), it keeps what it checked and the same command resumes. Exit status: 0 done, 2 bad
folder or bad file with --bad-files error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from moca_fast.config import ConfigError
from moca_fast.data.scan import printable, scan_images
from moca_fast.data.scan_pool import format_duration

EXIT_BAD_SETTING, EXIT_INTERRUPTED = 2, 130


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


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
    bad = len(images.skipped)
    checked = stats["checked"]
    rate = f" ({checked / stats['check_s']:,.0f} files/s on {stats['processes']} processes)" if checked else ""
    return (f"{printable(images.root)}: {len(images):,} images in {len(images.classes):,} classes, "
            f"{bad:,} bad file{'' if bad == 1 else 's'} skipped, {len(images.ignored):,} other entries not used; "
            f"checked {checked:,} files{rate}, {stats['cached']:,} verdicts reused, in {format_duration(seconds)}; "
            f"verdicts in {printable(stats['cache'])}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    stats: dict = {}
    started = time.monotonic()
    try:
        images = scan_images(args.folder, args.bad_files, processes=args.processes, stats=stats)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted ({e or 'SIGINT'}): the files checked so far are kept; the same command resumes",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary(images, stats, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
