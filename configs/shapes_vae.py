"""Stage 1 of latent diffusion on procedural shapes: a KL autoencoder, 32x32x3 images -> 8x8x4 latents.

python -m diffjax.main --config=configs/shapes_vae.py --workdir=/tmp/shapes_vae
python -m diffjax.main --config=configs/shapes_vae.py:tiny --workdir=/tmp/t   (seconds; for tests)

Then stage 2: configs/shapes_ldm.py with --config.vae.workdir=/tmp/shapes_vae.

Latents 8x8x4 (f = 4, three levels): 12x fewer numbers than the pixels, so the U-Net runs
at 8x8 like the digits model, while each 6-8 pixel shape still spans about 2x2 latent
cells (f = 8 would squeeze a shape into one cell; 16x16x4 at f = 2 compresses only 3x).
Squared error, not LDM's L1: shapes cover a few percent of the pixels, and L1's per-pixel
median is the black background. In two 300-step CPU runs (channels (32, 64, 64), batch 16)
L1 reconstructed near-black images (held-out PSNR 16.1 dB, checker read 0% of them right)
while L2 brought the shapes back, blurred (22.6 dB, all attributes right for 37%). The KL
weight is small (as in LDM); the latent scale is fixed afterwards by the scaling factor.
Sized for a 2-core CPU (1.9 steps/s; README: the measured reconstructions, per attribute). On a GPU, wider
channels (64, 128, 128) and longer runs fit.
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.job = "train_vae"
  c.seed = 0

  # The images of every caption pair, the held-out ones too: the autoencoder is an image codec, and the held-out
  # pairs test the LDM's text conditioning. Trained on "train" alone (20,000 images, no blue triangle), the VAE of
  # session 15 read back 39% of the held-out blue triangles as triangles (61% as circles), capping any U-Net there.
  # (the evaluation's split is one the VAE never trained on: "validation", the seen pairs' other images)
  c.data = dict(name="shapes_captions", data_dir="", train_split="train+held_out", eval_split="validation",
                batch_size=32, image_size=32, channels=3, max_shift=0, max_caption_length=48)
  # channels: per level from 32x32 down; len(channels) - 1 halvings. disc_*: the PatchGAN (off: disc_weight=0).
  c.vae = dict(channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_groups=8,
               mid_block_attention=True, reconstruction="l2", kl_weight=1e-6, disc_weight=0.0, disc_start=2000,
               disc_channels=32, disc_layers=2)
  c.optim = dict(learning_rate=1e-3, warmup_steps=100, final_lr_fraction=0.1, grad_clip=1.0, b1=0.9, b2=0.99,
                 weight_decay=0.0, grad_accum_steps=1)
  c.train = dict(num_steps=3000, ema_decay=0.999, log_every=100, checkpoint_every=500, keep_checkpoints=3)
  c.mesh = dict(data=-1, fsdp=1)
  # num_images: held-out images for the reconstruction error; scale_images: training images for the scaling factor.
  c.eval = dict(num_images=1000, scale_images=2048, grid_images=16)

  if arg == "tiny":
    c.data.train_split = "train[:256]"
    c.data.batch_size = 8
    c.vae.channels = (8, 16, 16)
    c.vae.norm_groups = 4
    c.vae.mid_block_attention = False
    c.vae.disc_channels = 8
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 2
    c.train.num_steps = 20
    c.train.ema_decay = 0.0
    c.train.log_every = 10
    c.train.checkpoint_every = 10
    c.eval.num_images = 32
    c.eval.scale_images = 64
    c.eval.grid_images = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use '' or 'tiny'")
  return c
