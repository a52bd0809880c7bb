"""Command line of ``dwi`` (the container's entrypoint and the ``local`` backend's).

Exit codes as anat's: 0 success; 2 the input is refused or an argument is bad (not retryable;
the message starts with the refusal's reason in brackets); 3 processing failed; 4 the output
folder cannot take the outputs; 1 anything unexpected. Errors are one line on stderr; on success
one JSON line on stdout lists the outputs and measures.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.anat.errors import AnatArgumentError, AnatOutputError
from pipelines.dwi import NAME, VERSION
from pipelines.dwi.errors import DwiArgumentError, DwiInputError, DwiOutputError, DwiProcessingError
from pipelines.dwi.run import run_dwi

_EXIT = ((DwiInputError, 2), (DwiArgumentError, 2), (AnatArgumentError, 2), (DwiProcessingError, 3),
         (DwiOutputError, 4), (AnatOutputError, 4))


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of b-values") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{NAME}",
                                description=f"{NAME} {VERSION}: DWI -> tensor maps and white-matter measures")
    p.add_argument("--input", required=True, help="dwi NIfTI with its .bval and .bvec beside it")
    p.add_argument("--output-dir", required=True, help="derivatives root, e.g. derivatives/dwi-<version>")
    p.add_argument("--subject", required=True, help="BIDS subject label (no 'sub-')")
    p.add_argument("--session", required=True, help="BIDS session label (no 'ses-')")
    for entity in ("acq", "rec", "dir"):
        p.add_argument(f"--{entity}", help=f"BIDS {entity} label")
    p.add_argument("--run", type=int, help="BIDS run index")
    p.add_argument("--shells", type=_floats, help="the protocol's b-values (s/mm2), e.g. 1000 or 1000,2000")
    p.add_argument("--volumes", type=int, help="the protocol's number of volumes")
    p.add_argument("--t1w", help="the same session's T1 as the anat pipeline corrected it (desc-preproc_T1w)")
    p.add_argument("--t1w-dseg", help="the anat pipeline's tissue labels of that T1 (dseg: 1 GM, 2 WM, 3 CSF)")
    p.add_argument("--container-digest", help="sha256:... of the image running this")
    p.add_argument("--threads", type=int, help="accepted for the runner; registration runs on one thread")
    p.add_argument("--version", action="version", version=f"{NAME} {VERSION}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entities = {k: getattr(args, k) for k in ("acq", "rec", "dir", "run") if getattr(args, k) is not None}
    try:
        result = run_dwi(args.input, args.output_dir, args.subject, args.session, entities=entities,
                         container_digest=args.container_digest, shells=args.shells, volumes=args.volumes,
                         t1w=args.t1w, t1w_dseg=args.t1w_dseg)
    except Exception as exc:  # one line, never a traceback, for the runner's provenance
        code = next((c for kind, c in _EXIT if isinstance(exc, kind)), 1)
        print(f"{NAME}: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return code
    print(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                      "measures": result.measures, "seconds": round(result.seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
