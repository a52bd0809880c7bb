"""``bold``: functional image quality of one BOLD series (BIDS func bold with its JSON sidecar), on
SimpleITK and nipype. QC only: no connectivity, no task model.

Module map, in the order the stages run:

- :mod:`pipelines.bold.errors`   refusals with a reason token, and the other failures
- :mod:`pipelines.bold.realign`  stage 1: rigid realignment of every volume, framewise displacement
- :mod:`pipelines.bold.iqms`     stage 2: MRIQC's functional image quality metrics, the slice timing
  check, the carpet
- :mod:`pipelines.bold.process`  the stages wired: load, mask, realign, measure
- :mod:`pipelines.bold.run`      BIDS derivatives: mask, mean and tSNR maps, confounds, carpet
  figure, measures with the QC sidecar
"""

NAME = "bold"
VERSION = "0.1.0"
