"""Command line of ``anat`` (the container's entrypoint and the ``local`` backend's).

Exit codes: 0 success; 2 bad input or argument (not retryable); 3 processing
failed; 4 the output folder cannot take the outputs; 1 anything unexpected.
Errors are one line on stderr; on success one JSON line on stdout lists the
outputs and measures.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.anat import NAME, VERSION, run_anat
from pipelines.anat.errors import (
    AnatArgumentError, AnatInputError, AnatOutputError, AnatProcessingError,
)

_EXIT = ((AnatInputError, 2), (AnatArgumentError, 2), (AnatProcessingError, 3), (AnatOutputError, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{NAME}",
                                description=f"{NAME} {VERSION}: T1w -> BIDS derivatives")
    p.add_argument("--input", required=True, help="T1w NIfTI (.nii or .nii.gz)")
    p.add_argument("--output-dir", required=True,
                   help="derivatives root, e.g. derivatives/anat-<version>")
    p.add_argument("--subject", required=True, help="BIDS subject label (no 'sub-')")
    p.add_argument("--session", required=True, help="BIDS session label (no 'ses-')")
    p.add_argument("--acq", help="BIDS acq label")
    p.add_argument("--run", type=int, help="BIDS run index")
    p.add_argument("--container-digest", help="sha256:... of the image running this")
    p.add_argument("--threads", type=int, help="SimpleITK threads (default: fixed 2)")
    p.add_argument("--version", action="version", version=f"{NAME} {VERSION}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entities = {k: v for k, v in (("acq", args.acq), ("run", args.run)) if v is not None}
    try:
        result = run_anat(args.input, args.output_dir, args.subject, args.session,
                          entities=entities, container_digest=args.container_digest,
                          threads=args.threads)
    except Exception as exc:  # one line, never a traceback, for the runner's provenance
        code = next((c for kind, c in _EXIT if isinstance(exc, kind)), 1)
        message = " ".join(str(exc).split())
        print(f"{NAME}: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return code
    print(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                      "measures": result.measures, "seconds": round(result.seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
