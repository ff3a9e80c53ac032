"""Generation pipelines: text (and an image) -> images with any network, process, solver and VAE.

``Pipeline`` (core) is the model side without parameters; ``stable_diffusion.from_pretrained``
builds one from a diffusers folder and the trainer from a diffjax run; ``generate`` runs
txt2img and img2img on the host, ``inpaint`` inpainting (``inpaint.py``: mask-conditioned networks,
blending and RePaint for any network); ``schedulers`` maps diffusers scheduler configs to
diffjax's process, solver and grid.
"""

from diffjax.pipelines.core import Guidance, Pipeline, denoiser, img2img, strength_start, txt2img
from diffjax.pipelines.generate import Output, generate, plan_for
from diffjax.pipelines.inpaint import InpaintingPipeline, RePaint, inpaint, inpaint_blended, inpaint_conditioned
from diffjax.pipelines.schedulers import DiffusersScheduler, Plan
from diffjax.pipelines.stable_diffusion import from_pretrained

__all__ = ["DiffusersScheduler", "Guidance", "InpaintingPipeline", "Output", "Pipeline", "Plan", "RePaint", "denoiser",
           "from_pretrained", "generate", "img2img", "inpaint", "inpaint_blended", "inpaint_conditioned", "plan_for",
           "strength_start", "txt2img"]
