"""``dwi``: a diffusion series (BIDS dwi with its .bval/.bvec) to tensor maps, white-matter FA/MD
and QC values, on dipy and SimpleITK.

Module map, in the order the stages run:

- :mod:`pipelines.dwi.errors`     refusals with a reason token, and the other failures
- :mod:`pipelines.dwi.gradients`  stage 1: the gradient table read and checked
- :mod:`pipelines.dwi.process`    the stages wired: brain mask, motion, tensor, white matter, QC values
- :mod:`pipelines.dwi.motion`     stage 3: motion and eddy-current correction, b-vectors rotated
- :mod:`pipelines.dwi.tensor`     stage 4: dipy's WLS tensor, maps in um2/ms, the gradient sign
  check, slice dropout
- :mod:`pipelines.dwi.anatomy`    stage 5b: the same session's T1 white matter registered onto the b0
  (when the run is given the anat pipeline's T1 and dseg)
- :mod:`pipelines.dwi.run`        BIDS derivatives: maps, masks, measures with the QC sidecar
- :mod:`pipelines.dwi.__main__`   the command line (the image's entrypoint, the local backend's)

0.2.0 adds the T1 white matter (``*_T1WM`` measures); 0.1.0 had the FA-threshold white matter only.
"""

NAME = "dwi"
VERSION = "0.2.0"
