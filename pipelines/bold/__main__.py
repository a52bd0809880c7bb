"""Command line of ``bold`` (the container's entrypoint and the ``local`` backend's).

Exit codes as anat's and dwi's: 0 success; 2 the input is refused or an argument is bad (not
retryable; the message starts with the refusal's reason in brackets); 3 processing failed; 4 the
output folder cannot take the outputs; 1 anything unexpected. Errors are one line on stderr; on
success one JSON line on stdout lists the outputs and measures.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.anat.errors import AnatArgumentError, AnatOutputError
from pipelines.bold import NAME, VERSION
from pipelines.bold.errors import BoldArgumentError, BoldInputError, BoldProcessingError
from pipelines.bold.run import OPTIONAL_ENTITIES, run_bold

_EXIT = ((BoldInputError, 2), (BoldArgumentError, 2), (AnatArgumentError, 2), (BoldProcessingError, 3),
         (AnatOutputError, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{NAME}",
                                description=f"{NAME} {VERSION}: BOLD series -> functional QC metrics and measures")
    p.add_argument("--input", required=True, help="bold NIfTI with its JSON sidecar beside it")
    p.add_argument("--output-dir", required=True, help="derivatives root, e.g. derivatives/bold-<version>")
    p.add_argument("--subject", required=True, help="BIDS subject label (no 'sub-')")
    p.add_argument("--session", required=True, help="BIDS session label (no 'ses-')")
    p.add_argument("--task", required=True, help="BIDS task label")
    for entity in OPTIONAL_ENTITIES:
        p.add_argument(f"--{entity}", type=int if entity in ("run", "echo") else str, help=f"BIDS {entity} label")
    p.add_argument("--volumes", type=int, help="the protocol's number of volumes")
    p.add_argument("--container-digest", help="sha256:... of the image running this")
    p.add_argument("--threads", type=int, help="volumes realigned side by side (each on one thread)")
    p.add_argument("--version", action="version", version=f"{NAME} {VERSION}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entities = {k: getattr(args, k) for k in OPTIONAL_ENTITIES if getattr(args, k) is not None}
    try:
        result = run_bold(args.input, args.output_dir, args.subject, args.session, args.task, entities=entities,
                          container_digest=args.container_digest, volumes=args.volumes,
                          threads=args.threads)
    except Exception as exc:  # one line, never a traceback, for the runner's provenance
        code = next((c for kind, c in _EXIT if isinstance(exc, kind)), 1)
        print(f"{NAME}: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return code
    print(json.dumps({"outputs": {k: str(v) for k, v in result.outputs.items()},
                      "measures": result.measures, "seconds": round(result.seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
