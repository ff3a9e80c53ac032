"""Generation pipelines: text (and an image) -> images with any network, process, solver and VAE.

``Pipeline`` (core) is the model side without parameters; ``stable_diffusion.from_pretrained``
builds one from a diffusers folder and the trainer from a diffjax run; ``generate`` runs
txt2img and img2img on the host; ``schedulers`` maps diffusers scheduler configs to
diffjax's process, solver and grid.
"""

from diffjax.pipelines.core import Guidance, Pipeline, denoiser, img2img, strength_start, txt2img
from diffjax.pipelines.generate import Output, generate, plan_for
from diffjax.pipelines.schedulers import DiffusersScheduler, Plan
from diffjax.pipelines.stable_diffusion import from_pretrained

__all__ = ["DiffusersScheduler", "Guidance", "Output", "Pipeline", "Plan", "denoiser", "from_pretrained", "generate",
           "img2img", "plan_for", "strength_start", "txt2img"]
