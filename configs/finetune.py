"""Fine-tuning a trained diffjax model on a few images: LoRA or full, with DreamBooth's prior preservation.

python -m diffjax.main --config=configs/finetune.py --workdir=/tmp/ft_blue_triangles \
    --config.base=/tmp/shapes_ldm --config.vae_workdir=/tmp/shapes_vae

``base``: a finished training workdir (its config.json and checkpoints; a latent model's VAE
folder is read from ``vae_workdir`` when it has moved since). The instance images are the first
``instance.num_images`` examples of the base's data set split ``instance.split`` whose captions
contain ``instance.caption_contains`` (default: blue triangles, a colour/shape pair the shapes
model never saw), or the image files of ``instance.folder``, captioned by its ``metadata.jsonl``
(lines {"file_name": ..., "text": ...}, the Hugging Face image-folder form) or else ``instance.prompt``.
``method``: "lora" trains rank-``lora.rank`` adapters on the kernels ``lora.targets`` select (the
U-Net's attention projections by default) with the base frozen; "full" trains every weight the
base trained; "textual_inversion" learns the rows of a new token (``textual_inversion.token``,
which the instance captions use) with everything else frozen. ``prior.weight`` > 0: DreamBooth's
prior preservation, ``prior.num_images`` images the base model draws for captions of
``prior.split`` (or ``prior.prompts``), trained on beside the instances with that weight. Outputs:
checkpoints/ (resumable), prior.npz (the prior images), lora.safetensors (diffusers format, for
``configs/generate.py --config.lora=``), learned_embeds.safetensors (textual inversion, diffusers
format) or controlnet/ (a diffusers ControlNetModel folder), finetune.png or control.png, and
eval.json.
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.job = "finetune"
  c.seed = 0
  c.base = ""  # a diffjax training workdir (config.json + checkpoints/)
  c.vae_workdir = ""  # a latent base's VAE workdir when it is not where the base's config says ("" = as it says)
  c.method = "lora"  # lora | full | textual_inversion | controlnet
  # the U-Net's ('denoiser') attention projections; '^text_encoder/' paths adapt a joint text encoder
  c.lora = dict(rank=4, alpha=4.0,
                targets=tuple(f"^denoiser/.*/{name}/kernel$" for name in ("to_q", "to_k", "to_v", "to_out_0")))
  # textual_inversion: a new token (num_vectors rows of the text encoder's token table, started from the mean row
  # of the initializer's tokens) learnt with everything else frozen; instance captions must contain it
  c.textual_inversion = dict(token="<new>", initializer="shape", num_vectors=1)
  # controlnet: a ControlNet initialised from the base's U-Net (frozen) trained on the instance images (for layouts
  # in general: instance.split=train, caption_contains="", num_images=20000) with a control map the data gives: the
  # shapes' mask or their edges
  # (embedding_channels: one entry per halving from the images' size to the latents' and one more: the shapes VAE's 4x)
  c.controlnet = dict(conditioning="mask", scale=1.0, embedding_channels=(16, 32, 64), eval_split="validation")
  c.instance = dict(split="held_out", caption_contains="blue triangle", folder="", prompt="", num_images=16,
                    batch_size=8)
  # DreamBooth prior preservation: images the base draws for captions of `split` (or `prompts`) keep what it knew
  c.prior = dict(weight=1.0, num_images=64, split="validation", prompts=(), batch_size=8)
  c.optim = dict(learning_rate=1e-3, warmup_steps=20, final_lr_fraction=0.1, grad_clip=1.0, b1=0.9, b2=0.99,
                 weight_decay=0.0, grad_accum_steps=1)
  c.train = dict(num_steps=400, cond_dropout=0.1, ema_decay=0.0, log_every=20, checkpoint_every=100,
                 keep_checkpoints=2)
  # evaluation: samples_per_prompt images for every instance caption (at most `prompts` of them) and as many for
  # captions of the prior split; shapes bases are judged per attribute (eval.json); prompts=0: no evaluation
  # token_colour "R,G,B": captions with the textual-inversion token are judged as asking for that colour
  c.eval = dict(prompts=4, samples_per_prompt=16, token_colour="")
  if arg == "tiny":  # seconds, for tests: a digits base (configs/default.py:tiny), its sevens as instances
    c.instance.split = "train"
    c.instance.caption_contains = "seven"
    c.instance.num_images = 4
    c.instance.batch_size = 2
    c.prior.num_images = 4
    c.prior.split = "test"
    c.prior.batch_size = 2
    c.optim.warmup_steps = 1
    c.train.num_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.eval.prompts = 2
    c.eval.samples_per_prompt = 1
    c.controlnet.embedding_channels = (16,)  # pixel space: control images at the model's size
    c.controlnet.eval_split = "test"
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use '' or 'tiny'")
  return c
