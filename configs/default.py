"""Text-to-image on the embedded handwritten digits (8x8, grey): the main job's default.

python -m diffjax.main --config=configs/default.py --workdir=/tmp/digits
python -m diffjax.main --config=configs/default.py:tiny --workdir=/tmp/t   (seconds; for tests)
"""

import ml_collections

from diffjax.data.digits import prompt_for


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0

  c.data = dict(name="digits_captions", data_dir="", train_split="train", batch_size=64, image_size=8, channels=1,
                max_shift=0, max_caption_length=40)
  c.model = dict(channels=(32, 64), layers_per_block=1, attention_levels=(False, True), num_heads=4, text_width=64,
                 text_layers=2, text_heads=4, norm_groups=8, dropout=0.0, mid_block_attention=True, remat=False,
                 attention="auto")  # diffjax.models.attention: auto, xla, einsum, blocked, cudnn, splash
  c.diffusion = dict(process="vp_cosine", process_options={}, target="v", weighting="uniform", weighting_options={},
                     time_sampler="uniform", time_sampler_options={}, time_scale=1000.0)
  c.optim = dict(learning_rate=2e-3, warmup_steps=100, final_lr_fraction=0.05, grad_clip=1.0, b1=0.9, b2=0.99,
                 weight_decay=0.0, grad_accum_steps=1)
  c.train = dict(num_steps=1500, cond_dropout=0.1, ema_decay=0.995, compute_dtype="float32", log_every=50,
                 checkpoint_every=500, keep_checkpoints=3, profile_steps=0)  # > 0: profile as many steps
  # name="fitted" with calibration=FILE: a sampler calibrated for the trained model (--mode=calibrate writes FILE)
  c.sampler = dict(name="dpmpp_2m", options={}, grid="log_snr", nfe=20, guidance_scale=2.0, calibration="")
  # --mode=calibrate: fitted samplers for these evaluation counts from reference paths (dopri5 at tol) of batch
  # noises with prompts (default config.prompts) drawn by seed, kept at a lattice of noise levels, chunk at a time.
  # Marks on the samples the evaluation and --mode=sample make (diffjax.watermark; see configs/generate.py):
  # "pixel+latent" | "pixel" | "latent" | "none"; the pixel mark needs RGB >= 256 x 256 and the latent mark a latent
  # that can carry a detectable one (rank >= 64), so these small models' samples stay unmarked (the record says why)
  c.watermark = "pixel+latent"
  c.watermark_seed = 20261206
  c.watermark_radius = 0.0  # the latent key's radius in frequency units (0: 10/64 of the latent's side)
  # restarts: starting grids each budget's search descends from; refine: Levenberg-Marquardt iterations on each
  # searched sampler's final error (0: none); minutes: the calibration's time bound (0: none)
  c.calibration = dict(budgets=(4, 5, 6, 8, 10), batch=256, validation_batch=256, lattice=48, tol=1e-5, chunk=256,
                       seed=7919, prompts=(), restarts=1, refine=0, minutes=0.0)
  # Device mesh (data x fsdp = all devices; data=-1: what fsdp leaves) and the rules mapping the parameters'
  # logical axes (diffjax.models.layers) to mesh axes, tried in order; fsdp > 1 shards params and optimizer state.
  c.mesh = dict(data=-1, fsdp=1, rules=(("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", "fsdp")))
  # Several processes (hosts): all run the same command with their own process_id (see README).
  c.distributed = dict(coordinator_address="", num_processes=1, process_id=0)
  # A grid of samples_per_prompt per prompt; digits_per_prompt samples per digit judged (0: no evaluation) by prompt
  # accuracy and the sample metrics (diffjax.evaluate.features), each reported if it passes the metric sanity suite
  # (sanity_repeats draws).
  c.eval = dict(samples_per_prompt=10, digits_per_prompt=50, sanity_repeats=5)
  c.prompts = tuple(prompt_for(d) for d in range(10))

  if arg == "tiny":
    c.data.batch_size = 8
    c.model.channels = (16, 32)
    c.model.text_width = 32
    c.model.text_layers = 1
    c.train.num_steps = 6
    c.optim.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.profile_steps = 2
    c.sampler.nfe = 3
    c.eval.samples_per_prompt = 1
    c.eval.digits_per_prompt = 1  # same batch as the grid: one sampler compilation
    c.eval.sanity_repeats = 1
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use '' or 'tiny'")
  return c
