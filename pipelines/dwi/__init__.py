"""``dwi``: a diffusion series (BIDS dwi with its .bval/.bvec) to tensor maps, white-matter FA/MD
and QC values, on dipy and SimpleITK.

Module map, in the order the stages run:

- :mod:`pipelines.dwi.errors`     refusals with a reason token, and the other failures
- :mod:`pipelines.dwi.gradients`  stage 1: the gradient table read and checked
- :mod:`pipelines.dwi.process`    the stages wired: brain mask, motion, tensor, white matter, QC values
- :mod:`pipelines.dwi.motion`     stage 3: motion and eddy-current correction, b-vectors rotated
- :mod:`pipelines.dwi.tensor`     stage 4: dipy's WLS tensor, maps in um2/ms, the gradient sign
  check, slice dropout

Not yet here (issue 13 goes on): writing BIDS derivatives and the command line, the pipeline
spec in ``pipelines/registry.py``, its image in ``containers/``.
"""

NAME = "dwi"
VERSION = "0.1.0"
