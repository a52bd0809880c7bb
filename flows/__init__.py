"""Prefect flows of corelab (thin: they wire tasks and decide), their settings and the CLI.

runtime         every process-wide setting; imported first, before Prefect
receive_study   flow: accept or bounce a site's upload within seconds
process_study   flow: BIDS, pinned pipelines, QC gate, biomarkers for one received study
nightly         flow: nightly reprocessing (new, retryable, pipeline-changed)
harmonize       flow: ComBat fit or frozen-model apply on the lake's QC-passed biomarkers
cli/            the ``corelab`` command line (one package for every command)
"""

from flows import runtime  # noqa: F401  (environment defaults before Prefect loads)
