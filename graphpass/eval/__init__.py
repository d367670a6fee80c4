"""Quality checks for sampled videos: pixel fidelity to a baseline and physics plausibility."""

from .metrics import psnr, ssim
from .physics import PhysicsReport, evaluate, physics_score

__all__ = ["psnr", "ssim", "evaluate", "physics_score", "PhysicsReport"]
