"""Generation pipelines: text (and an image) -> images with any network, process, solver and VAE.

``Pipeline`` (core) is the model side without parameters; ``from_pretrained`` (``folders``)
builds one from a diffusers folder and the trainer from a diffjax run; ``generate`` runs
txt2img and img2img on the host, ``inpaint`` inpainting (``inpaint.py``: mask-conditioned networks,
blending and RePaint for any network), ``upscale`` the x4 upscaler (``upscale.py``), ``sdxl`` SDXL base
(two text encoders, reached through ``from_pretrained`` too), ``pixart`` PixArt-alpha / Sigma (also through
``from_pretrained``; ``pixart.generate`` adds diffusers' resolution binning); ``controlnet`` steers an SD pipeline
with ControlNets (``with_controlnets``) for any of these tasks; ``schedulers``
maps diffusers scheduler configs to diffjax's process, solver and grid.
"""

from diffjax.pipelines import calibrate, controlnet, pixart
from diffjax.pipelines.core import Guidance, Pipeline, denoiser, img2img, strength_start, txt2img
from diffjax.pipelines.folders import from_pretrained
from diffjax.pipelines.generate import Output, generate, on_mesh, plan_for
from diffjax.pipelines.inpaint import InpaintingPipeline, RePaint, inpaint, inpaint_blended, inpaint_conditioned
from diffjax.pipelines.inversion import Inverted, invert_images
from diffjax.pipelines.schedulers import DiffusersScheduler, Plan
from diffjax.pipelines.sdxl import assemble_sdxl, sdxl_from_pretrained
from diffjax.pipelines.single_file import from_single_file
from diffjax.pipelines.upscale import UpscalePipeline, upscale, upscale_image

__all__ = ["DiffusersScheduler", "Guidance", "InpaintingPipeline", "Inverted", "Output", "Pipeline", "Plan", "RePaint",
           "UpscalePipeline", "assemble_sdxl", "calibrate", "controlnet", "denoiser", "from_pretrained",
           "from_single_file", "generate", "img2img", "inpaint", "inpaint_blended", "inpaint_conditioned",
           "invert_images", "on_mesh", "pixart", "plan_for", "sdxl_from_pretrained", "strength_start", "txt2img",
           "upscale", "upscale_image"]
