"""Stage 2 of latent diffusion on procedural shapes with a transformer: a small MMDiT (SD3's joint-attention
backbone) trained by rectified flow with logit-normal times, on the latents of the same frozen VAE.

python -m diffjax.main --config=configs/shapes_mmdit.py --workdir=/tmp/shapes_mmdit --config.vae.workdir=/tmp/shapes_vae
python -m diffjax.main --config=configs/shapes_mmdit.py:tiny --workdir=/tmp/t --config.vae.workdir=DIR   (tests)

Everything but the denoiser and the noise process is configs/shapes_ldm.py's (data, text encoder trained
jointly, evaluation, sampler, checkpoints), so the two runs compare the backbones:
* ``model``: ``backbone="mmdit"``, ``width`` (= num_heads x head size), ``depth`` (joint blocks),
  ``patch_size`` (latent cells per token side: 1 keeps the 8 x 8 latents' 64 cells as 64 tokens; a
  shape spans about 2 x 2 cells), ``qk_norm`` (SD3.5's RMS norm of queries and keys, for stable
  training at a higher learning rate). The text encoder's end-of-text state is the pooled vector.
* ``repa``: REPA's auxiliary loss (``weight`` > 0; needs ``data.cache_latents=False``): the image tokens after
  block ``layer`` projected by a ``projector_width`` MLP onto the frozen VAE encoder's features.
* ``diffusion``: x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0 at 1000 t, t drawn
  from the logit-normal of SD3 (``losses.logit_normal_time``, mean 0, std 1).
"""

from configs import shapes_ldm


def get_config(arg: str = ""):
  c = shapes_ldm.get_config(arg)
  # sized to cost about what the U-Net does per step: 45.3 against 36.7 GFLOP per batch of 64, text encoder included
  # (python -m benchmarks.backbone_flops configs/shapes_ldm.py configs/shapes_mmdit.py --latent_shape 8,8,4)
  c.model = dict(backbone="mmdit", width=128, depth=4, patch_size=1, num_heads=4, qk_norm=True, text_width=128,
                 text_layers=2, text_heads=4, remat=False, attention="auto")
  c.diffusion = dict(process="rectified_flow", process_options={}, target="velocity", weighting="uniform",
                     weighting_options={}, time_sampler="logit_normal", time_sampler_options={}, time_scale=1000.0)
  # representation alignment (diffjax/train/repa.py): --config.repa.weight=0.5 --config.data.cache_latents=False
  # aligns the image tokens after block `layer` with the frozen VAE encoder's features (0: off)
  c.repa = dict(weight=0.0, layer=2, projector_width=256)
  c.optim.learning_rate = 3e-4  # transformers train at lower rates than the U-Net's 1e-3
  c.sampler.grid = "uniform_t"  # rectified flow starts at pure noise (alpha(1) = 0), where log-SNR grids cannot
  if arg == "tiny":
    c.model.width = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.model.text_width = 32
    c.model.text_layers = 1
  return c
