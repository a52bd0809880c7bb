"""Every setting that shapes the outputs of ``anat``, in one frozen record.

The record is written into each output's sidecar, so two runs with equal
inputs, parameters and software versions must give equal voxels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class AnatParameters:
    """Settings of the anatomical pipeline (defaults are the released ones)."""

    #: Threads for SimpleITK's voxel-wise filters (speed only: N4 and registration
    #: always run on one thread, see process.one_thread, so outputs do not depend on it).
    threads: int = 2
    #: N4: fitting grid spacing (mm; the image is shrunk by an integer factor to about this).
    n4_grid_mm: float = 6.0
    #: N4: maximum iterations per fitting level (one entry per level).
    n4_iterations: tuple[int, ...] = (50, 50, 50)
    #: N4: B-spline control points per axis at the first level (doubled mesh per level).
    n4_control_points: int = 4
    #: N4: convergence threshold per level.
    n4_convergence: float = 1e-4
    #: Registration grid (mm) for the template and the subject.
    registration_spacing_mm: float = 2.0
    #: Seed of the metric's random sampling.
    registration_seed: int = 20261123
    #: Fraction of the metric mask's voxels sampled per iteration.
    registration_sampling: float = 0.2
    #: Pseudo-head bands around the template brain (see register.pseudo_head).
    shell_dark_mm: float = 7.0
    shell_bright_mm: float = 13.0
    shell_above_mm: float = 0.0
    #: The warped template mask (linearly interpolated) is cut at this value.
    mask_threshold: float = 0.5
    #: Curvature-flow iterations on the T1 before segmentation (0: none).
    denoise_iterations: int = 5
    #: Exponent of the tissue priors in the posterior.
    prior_weight: float = 1.0
    #: Weight of the neighbours' tissue (mean-field MRF).
    mrf_beta: float = 0.5
    #: EM iterations at most, and the relative mean shift that stops them.
    em_max_iterations: int = 50
    em_tolerance: float = 1e-4
    #: EM iterations with the MRF term, after plain EM.
    mrf_iterations: int = 5

    def with_threads(self, threads: int | None) -> "AnatParameters":
        """A copy with ``threads`` set (``None`` keeps the default)."""
        if threads is None:
            return self
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return replace(self, threads=int(threads))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
