"""Stage 6, pipelines: pinned images run on BIDS images, with provenance.

engines      exact command lines of podman, docker and apptainer, and image checks
runner       run a pipeline spec with a backend (or locally, when proven equal to the image)
derivatives  one pipeline on one BIDS image into the lake's derivatives (PipelineRun), read
             back through the pipeline's spec
"""
