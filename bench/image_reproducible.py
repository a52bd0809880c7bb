"""Is a pipeline image reproducible? Build it, rebuild it from a clean cache, compare the digests.

    python bench/image_reproducible.py [IMAGE] [--cached-base] [--record]

1. ``corelab containers build IMAGE --no-cache`` in podman's own store (every layer built again,
   on the base image present there): digest A, seconds.
2. :func:`pipelines.image_build.check_reproducible`: the same build in an empty podman store of its
   own, no cache at all, and the base made again, debootstrap included (as on another machine;
   ``--cached-base`` reuses the cached rootfs tarball): digest B, seconds.

Prints both digests, the wall times and, when they differ, what differs (config fields, and per
layer the files whose content, mtime, mode, owner... changed). Writes a temporary copy of
containers/lock unless ``--record``, which records the build and the outcome (``reproducible``,
``rebuilt_digest``, ``differs``) in containers/lock itself. Exit status 1 when the digests differ.
Takes about 5 minutes on 2 cores (two full builds, one debootstrap).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.image_build import build_image, check_reproducible  # noqa: E402
from pipelines.images import LOCK_PATH  # noqa: E402
from pipelines.registry import spec_for_image  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", nargs="?", default="anat")
    parser.add_argument("--cached-base", action="store_true",
                        help="reuse the cached debootstrap tarball for the clean rebuild")
    parser.add_argument("--record", action="store_true", help="write containers/lock itself")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each command")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    spec = spec_for_image(args.image)
    with tempfile.TemporaryDirectory(prefix="corelab-bench-lock-") as tmp:
        lock = LOCK_PATH if args.record else Path(tmp) / "lock"
        if not args.record and LOCK_PATH.exists():
            shutil.copy(LOCK_PATH, lock)
        started = time.monotonic()
        entry = build_image(spec, lock_path=lock, no_cache=True)
        first = time.monotonic() - started
        print(f"{args.image}: build A (podman's store, --no-cache)          {entry.digest}  {first:6.0f} s")
        result = check_reproducible(spec, lock, fresh_base=not args.cached_base)
        where = "cached rootfs" if args.cached_base else "debootstrap again"
        print(f"{args.image}: build B (empty store, no cache, {where:<17}) {result.rebuilt}  "
              f"{result.seconds:6.0f} s")
    print(f"{args.image}: " + ("reproducible: same digest" if result.reproducible else "NOT reproducible"))
    for line in result.differs:
        print(f"  differs: {line}")
    return 0 if result.reproducible else 1


if __name__ == "__main__":
    sys.exit(main())
