"""SDXL base: diffjax against diffusers' StableDiffusionXL(Img2Img)Pipeline on one tiny random-weight folder.

The test builds a diffusers SDXL pipeline with random weights at tiny shapes (a U-Net with the
text_time addition embedding and per-level transformer depths (1, 2), two CLIP text encoders of
different widths, the second with a projection, both tokenizers from one small BPE vocabulary, the
second padding with "!" as the release's does), saves it once, loads the folder with
``pipelines.from_pretrained`` and compares final images in [0, 1] for the same prompts and initial
latents. The tolerance is test_pipelines_parity's: 1e-4 on images, far above float32 rounding
through ~40 layers and the samplers (4e-5 on unit-scale data), far below what a wrong time id or
negative conditioning moves (checked: > 1e-3) or a wrong grid (test_pipelines_parity).
Each scheduler compiles one program: four txt2img cases and one img2img keep the file near a minute.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_pipelines_parity import ATOL, NEGATIVE, PROMPTS, SCHEDULERS, SD_SCHEDULER, SIZE, _nhwc, _perturb, _torch_draws
from test_tokenizers import CORPUS, write_clip_files

from diffjax import pipelines

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 8
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW; the tiny VAE downsamples by 2


def _clip(vocab, cls, hidden, **extra):
  return _perturb(cls(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"], **extra)))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """(diffusers pipeline, diffjax pipeline, params) of one tiny SDXL folder (its scheduler: Euler, as the release)."""
  folder = tmp_path_factory.mktemp("sdxl")
  torch.manual_seed(0)
  vocab, files = write_clip_files(str(folder), CORPUS + PROMPTS + NEGATIVE)
  unet = _perturb(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      cross_attention_dim=32 + 24, attention_head_dim=(2, 4), use_linear_projection=True,
      transformer_layers_per_block=(1, 2), norm_num_groups=8, addition_embed_type="text_time",
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8))
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
      sample_size=SIZE, scaling_factor=0.13025, force_upcast=True), scale=0.02)
  cls, options = SCHEDULERS["euler"]
  ref = diffusers.StableDiffusionXLPipeline(
      vae=vae, unet=unet, scheduler=getattr(diffusers, cls)(**SD_SCHEDULER, **options),
      text_encoder=_clip(vocab, transformers.CLIPTextModel, 32),
      text_encoder_2=_clip(vocab, transformers.CLIPTextModelWithProjection, 24, projection_dim=16),
      tokenizer=transformers.CLIPTokenizer(*files, model_max_length=16),
      tokenizer_2=transformers.CLIPTokenizer(*files, model_max_length=16, pad_token="!"),
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  ref.set_progress_bar_config(disable=True)
  ref.save_pretrained(folder / "sdxl")
  pipe, params = pipelines.from_pretrained(folder / "sdxl")
  return ref, pipe, params


@pytest.fixture(scope="module")
def latents():
  return np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# euler: the folder's own scheduler and no negative prompt (force_zeros_for_empty_prompt's zeros);
# the others with negative prompts.
# DDIM and DPM-Solver++ 2M map through the same scheduler code as for SD (test_pipelines_parity.py runs all four):
# here in the slow set, to keep the default suite's time.
@pytest.mark.parametrize("scheduler", ["euler", "pndm", pytest.param("ddim", marks=pytest.mark.slow),
                                       pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_sdxl_txt2img_matches_diffusers(sdxl, latents, scheduler):
  ref_pipe, pipe, params = sdxl
  negative = None if scheduler == "euler" else NEGATIVE
  cls, options = SCHEDULERS[scheduler]
  ref_pipe.scheduler = getattr(diffusers, cls)(**SD_SCHEDULER, **options)
  if scheduler == "euler":
    plan = pipelines.plan_for(pipe, STEPS)
    assert pipe.scheduler.class_name == cls
  else:
    plan = pipelines.DiffusersScheduler.from_config(dict(ref_pipe.scheduler.config, _class_name=cls)).plan(STEPS)

  def reference(**kw):
    with torch.no_grad():
      return ref_pipe(PROMPTS, negative_prompt=negative, height=SIZE, width=SIZE, guidance_scale=6.0,
                      latents=torch.from_numpy(latents), output_type="np", **({"num_inference_steps": STEPS} | kw)
                      ).images

  ref = reference()
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=negative, height=SIZE, width=SIZE, plan=plan,
                           guidance_scale=6.0, noise=_nhwc(latents))
  assert out.images.shape == ref.shape == (2, SIZE, SIZE, 3)
  diff = _max_diff(out.images, ref)
  print(f"sdxl txt2img[{scheduler}, negative={negative is not None}] max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  # The check has teeth (diffusers alone, no compilation): for the zeros path, other time ids and the
  # empty prompt encoded instead of zeros each move the images by far more.
  if negative is None:
    assert out.record["negative_prompts"] is None
    assert _max_diff(reference(original_size=(2 * SIZE, 2 * SIZE)), out.images) > 10 * ATOL
    ref_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
      assert _max_diff(reference(), out.images) > 10 * ATOL
    finally:
      ref_pipe.register_to_config(force_zeros_for_empty_prompt=True)


def test_sdxl_img2img_matches_diffusers(sdxl):
  """StableDiffusionXLImg2ImgPipeline (Euler, strength 0.5, negative prompts): posterior and added noise
  replayed from diffusers' generator (the posterior draw first), as test_pipelines_parity does."""
  ref_pipe, pipe, params = sdxl
  cls, options = SCHEDULERS["euler"]
  components = dict(ref_pipe.components, scheduler=getattr(diffusers, cls)(**SD_SCHEDULER, **options))
  ref_i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**components, add_watermarker=False)
  ref_i2i.set_progress_bar_config(disable=True)
  image = np.random.default_rng(3).uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_i2i(PROMPTS, image=torch.from_numpy(image).permute(0, 3, 1, 2), strength=0.5, negative_prompt=NEGATIVE,
                  num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(11)).images
  posterior, noise = _torch_draws(11, LATENT, 2)
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                           plan=pipelines.plan_for(pipe, STEPS), guidance_scale=5.0, image=image, strength=0.5,
                           noise=_nhwc(noise), image_noise=_nhwc(posterior))
  assert out.record["first_step"] == STEPS // 2
  diff = _max_diff(out.images, ref)
  print(f"sdxl img2img max abs diff {diff:.2e}")
  assert diff <= ATOL, diff


def test_sdxl_folder_checks(sdxl, tmp_path):
  """The loaded pieces: two encoders' params, (B, 2, L) ids with each tokenizer's padding, and the checks."""
  _, pipe, params = sdxl
  assert set(params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
  ids, _ = pipe.tokenize(["a cat"])
  assert ids.shape == (1, 2, 16) and ids[0, 0, -1] != ids[0, 1, -1]  # "<|endoftext|>" vs "!" padding
  cond = jax.eval_shape(pipe.encode_text, params, ids, np.ones_like(ids))
  assert cond[0].shape == (1, 16, 32 + 24) and cond[1].shape == (1, 16)
  assert pipelines.sdxl.time_ids(SIZE, 2 * SIZE) == (SIZE, 2 * SIZE, 0, 0, SIZE, 2 * SIZE)
