"""Generation from a pretrained pipeline: a Stable Diffusion (diffusers) folder or a diffjax training workdir.

python -m diffjax.main --config=configs/generate.py --workdir=/tmp/gen \
    --config.pretrained=PATH --config.prompts="('a photo of a cat', 'a lake at dawn')"
img2img: --config.task=img2img --config.init_image=photo.png --config.strength=0.6
inpainting: --config.task=inpaint --config.init_image=photo.png --config.mask_image=mask.png
  (white = regenerate; an SD inpainting folder conditions on the mask, any other model blends,
  with RePaint resampling when --config.repaint.jump_length=10 --config.repaint.jump_n_sample=10)
x4 upscaling (an SD x4 upscaler folder): --config.task=upscale --config.init_image=small.png
  --config.noise_level=20 (the output is 4x the image; height and width are ignored)
A single-file SD 1.x/2.x checkpoint: --config.pretrained=sd.safetensors --config.tokenizer=DIR
  (a CLIP tokenizer folder; --config.prediction_type=v_prediction overrides the family's default).
Sampler: the folder's scheduler (``sampler.name = ""``) with ``sampler.steps`` steps, or any
diffjax solver by name on ``sampler.grid`` within ``sampler.steps`` network evaluations
(e.g. --config.sampler.name=dpmpp_2m --config.sampler.grid=karras --config.sampler.steps=20), or a sampler
fitted to this pipeline: python -m diffjax.main --mode=calibrate --config=configs/generate.py --workdir=/tmp/gen
--config.pretrained=PATH (writes /tmp/gen/calibration.json), then --config.sampler.name=fitted
--config.sampler.calibration=/tmp/gen/calibration.json --config.sampler.steps=5.
Outputs under --workdir: one PNG per image, samples.npz, generation.json (everything needed
to reproduce each image: seed, sampler, grid, guidance, the weights' SHA-256, the marks written).
Every image is marked (--config.watermark=none opts out); which marks images carry:
python -m diffjax.main --mode=detect --config=configs/generate.py --workdir=/tmp/det \
    --config.pretrained=PATH --config.detect.images=/tmp/gen (writes /tmp/det/detection.json).
LoRA files merged into the weights: --config.lora="('style.safetensors', 'detail.safetensors:0.5')".
ControlNets (txt2img, img2img, inpaint of an SD 1.x/2.x model or a diffjax U-Net workdir; diffusers folders, original
single files or the controlnet/ a finetune job wrote, with the controlnet.scale it trained at as controlnet_scale), one
control image each (resized to the output): --config.controlnet="('canny_cn', 'depth.safetensors')"
  --config.control_image="('edges.png', 'depth.png')" --config.controlnet_scale="(1.0, 0.5)"
  --config.control_start=0.0 --config.control_end=0.8 (fractions of the steps) --config.guess_mode=True.
The arg ``tiny`` (configs/generate.py:tiny) makes small, fast settings for a check.
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "generate"
  config.pretrained = ""  # a diffusers folder (model_index.json), a diffjax workdir (config.json) or an SD file
  config.tokenizer = ""  # single-file checkpoints only: the CLIP tokenizer folder
  config.prediction_type = ""  # single-file checkpoints only: "" = the family's default (SD 1 epsilon, SD 2 v)
  # LoRA files (diffusers/peft or kohya safetensors) merged into the weights: "FILE" or "FILE:SCALE" each
  config.lora = ()
  # ControlNets (diffusers folders, original single files, a finetune job's controlnet/) and one control image each,
  # resized to the output (a diffjax workdir's: set height and width to its image size);
  # scale, start and end (fractions of the steps the ControlNet acts in): one for all ControlNets or one each
  config.controlnet = ()
  config.control_image = ()
  config.controlnet_scale = (1.0,)
  config.control_start = (0.0,)
  config.control_end = (1.0,)
  config.guess_mode = False  # residuals only for the prompt's branch of classifier-free guidance
  config.task = "txt2img"  # txt2img | img2img | inpaint | upscale
  config.prompts = ("a photograph of an astronaut riding a horse",)
  config.negative_prompt = ""  # one for all prompts ("" = unconditional)
  config.num_per_prompt = 1
  config.height = 512  # pixels; img2img/inpaint: must equal the init image's size (0: take it from the image)
  config.width = 512
  config.init_image = ""  # img2img/inpaint: an RGB image file
  config.mask_image = ""  # inpaint: a grey image file of the init image's size, >= 0.5 (white) = regenerate
  config.strength = 0.0  # img2img/inpaint: how far towards noise, in (0, 1]; 0 = the task's default (0.8 / 1.0)
  config.repaint = ml_collections.ConfigDict()  # inpaint with a model not trained for it: RePaint resampling
  config.repaint.jump_length = 0  # grid intervals per jump back up (0 = no resampling; 10 in the paper)
  config.repaint.jump_n_sample = 0  # passes over each jump (10 in the paper)
  config.noise_level = 20  # upscale: the noise the low-res image gets, in [0, the folder's max_noise_level]
  config.seed = 0  # image i gets seed + i
  config.batch_size = 4  # images per compiled call
  config.dtype = "float32"  # computation dtype of the networks (bfloat16 on accelerators)
  # JAX's persistent compilation cache: a second run with the same shapes skips compiling ("" = off)
  config.compilation_cache = "~/.cache/diffjax/jax"
  config.sampler = ml_collections.ConfigDict()
  config.sampler.name = ""  # "": the folder's scheduler; else a diffjax solver (euler, heun, dpmpp_2m, ...)
  config.sampler.grid = "karras"  # the diffjax solver's grid (ignored for the folder's scheduler)
  config.sampler.steps = 50  # scheduler steps, or the diffjax solver's network evaluations
  config.sampler.options = ml_collections.ConfigDict()  # solver options (diffjax solvers only)
  config.sampler.guidance_scale = 7.5
  config.sampler.guidance_rescale = 0.0  # phi of Lin et al. (2024); 0 = off
  config.sampler.calibration = ""  # name="fitted": the file --mode=calibrate wrote (steps = a fitted budget)
  # --mode=calibrate (txt2img at height x width, guided as sampler and negative_prompt say): fitted samplers for
  # these evaluation counts, from dopri5 reference paths of batch noises with prompts drawn from prompts
  # (default config.prompts), kept at a lattice of noise levels, chunk samples at a time
  # restarts: starting grids each budget's search descends from; refine: Levenberg-Marquardt iterations on each
  # searched sampler's final error (0: none); minutes: the calibration's time bound (0: none)
  config.calibration = ml_collections.ConfigDict(dict(budgets=(4, 5, 6, 8, 10), batch=64, validation_batch=64,
                                                      lattice=48, tol=1e-5, chunk=8, seed=7919, prompts=(),
                                                      restarts=1, refine=0, minutes=0.0))
  # Marks on every image (diffjax.watermark): "pixel+latent", "pixel" (dwtDct, RGB >= 256 x 256), "latent" (the
  # key's pattern in txt2img's initial noise) or "none"; watermark_seed is the latent mark's key (the public default
  # marks "made with diffjax": set your own to keep it secret)
  config.watermark = "pixel+latent"
  config.watermark_seed = 20261206
  config.watermark_radius = 0.0  # the latent key's radius in frequency units (0: 10/64 of the latent's side)
  # --mode=detect: the images to read (a folder, a glob or comma-separated files); a mark is reported when its
  # p-value is below alpha. The latent mark is read by inverting each image with config.pretrained (the empty prompt,
  # guidance 1, config.sampler's plan, at height x width). decoder_steps > 0 first refines the VAE encoder's latents by
  # that many gradient steps on the decoder's pixel error (pipelines.decoder_inversion: each a decoder forward and
  # backward pass; what it buys is measured in benchmarks/README.md, the watermark section)
  config.detect = ml_collections.ConfigDict(dict(images="", alpha=1e-3, decoder_steps=0))
  if arg == "tiny":
    config.height = config.width = 64
    config.sampler.steps = 4
    config.batch_size = 2
  return config
