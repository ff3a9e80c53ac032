"""SD3: diffjax against diffusers' StableDiffusion3Pipeline on one tiny random-weight folder.

The folder holds two CLIP encoders with projections (widths 16 and 24, so their states are
zero-padded to T5's 48), a T5 encoder, an MMDiT, a 16-pixel VAE with SD3's scaling and shift
factors, the flow-matching Euler scheduler with SD3's shift 3, CLIP tokenizers from one small BPE
vocabulary and a T5 tokenizer trained in the test. Images in [0, 1] for the same prompts, negative
prompts and initial latents must agree within test_pipelines_parity's 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_pipelines_parity import ATOL, NEGATIVE, PROMPTS, SIZE, _nhwc, _perturb
from test_tokenizers import CORPUS, T5_CORPUS, write_clip_files, write_t5_tokenizer

from diffjax import pipelines
from diffjax.pipelines.sd3 import sd3_from_pretrained

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 4
T5_LENGTH = 12
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW; the tiny VAE downsamples by 2


def _clip(vocab, hidden):
  return _perturb(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, projection_dim=16, bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  """(diffusers pipeline, diffjax pipeline, params) of one tiny SD3 folder."""
  folder = tmp_path_factory.mktemp("sd3")
  torch.manual_seed(0)
  vocab, files = write_clip_files(str(folder), CORPUS + PROMPTS + NEGATIVE)
  write_t5_tokenizer(str(folder), T5_CORPUS + PROMPTS + NEGATIVE)
  t5_tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>", extra_ids=0)
  t5 = _perturb(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=t5_tokenizer.vocab_size, d_model=48, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)))
  transformer = _perturb(diffusers.SD3Transformer2DModel(
      sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
      pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)))
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
      sample_size=SIZE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
      use_post_quant_conv=False), scale=0.02)
  ref = diffusers.StableDiffusion3Pipeline(
      transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
      text_encoder=_clip(vocab, 16), text_encoder_2=_clip(vocab, 24), text_encoder_3=t5,
      tokenizer=transformers.CLIPTokenizer(*files, model_max_length=16),
      tokenizer_2=transformers.CLIPTokenizer(*files, model_max_length=16, pad_token="!"), tokenizer_3=t5_tokenizer)
  ref.set_progress_bar_config(disable=True)
  ref.save_pretrained(folder / "sd3")
  assert type(pipelines.from_pretrained(folder / "sd3")[0].scheduler).__name__ == "DiffusersScheduler"
  pipe, params = sd3_from_pretrained(folder / "sd3", max_sequence_length=T5_LENGTH)  # diffusers' call below
  return ref, pipe, params


def test_sd3_txt2img_matches_diffusers(sd3):
  ref_pipe, pipe, params = sd3
  assert pipe.scheduler.class_name == "FlowMatchEulerDiscreteScheduler" and pipe.time_scale == 1000.0
  latents = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)

  def reference(guidance_scale=5.0):
    with torch.no_grad():
      return ref_pipe(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=guidance_scale,
                      num_inference_steps=STEPS, latents=torch.from_numpy(latents), max_sequence_length=T5_LENGTH,
                      output_type="np").images

  ref = reference()
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                           plan=pipelines.plan_for(pipe, STEPS), guidance_scale=5.0, noise=_nhwc(latents))
  assert out.images.shape == ref.shape == (2, SIZE, SIZE, 3)
  diff = float(np.abs(out.images - ref).max())
  print(f"sd3 txt2img max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  # The check has teeth: another guidance scale moves diffusers' images by far more than the tolerance.
  assert float(np.abs(reference(guidance_scale=3.0) - out.images).max()) > 10 * ATOL


@pytest.mark.slow  # 7 min beside a training run (three dopri5 compilations of the guided tiny SD3)
def test_sd3_calibrates_from_pure_noise_and_samples_with_the_fitted_plan(sd3, tmp_path):
  """--mode=calibrate's pipeline path on a flow-matching pipeline (t = 1 is pure noise): the calibration runs, its
  3-evaluation sampler is closer to the reference ODE solution on the validation noise than the folder's own
  FlowMatchEuler schedule at 3 steps, and it samples through the pipeline layer (finite images)."""
  import jax
  import jax.numpy as jnp

  from diffjax.pipelines import calibrate
  from diffjax.samplers import sample

  _, pipe, params = sd3
  path = str(tmp_path / "calibration.json")
  key = {"model": "tiny-sd3", "guidance_scale": 5.0}
  record = calibrate.calibrate(pipe, params, PROMPTS, path, key=key, guidance_scale=5.0, height=SIZE, width=SIZE,
                               budgets=(2, 3), batch=8, validation_batch=8, seed=7919, lattice=12, tol=1e-5, chunk=8,
                               log=lambda s: None)
  assert record["lattice"][0] == 1.0 and np.isfinite(record["reference"]["target_error_rms"])
  with np.load(path + ".reference.npz") as z:
    target_val = z["target_val"]
  x_val, c_val = calibrate.prompted_noise(pipe, params, PROMPTS, 7919, 1, 8, height=SIZE, width=SIZE)
  denoise = calibrate.guided_denoiser(pipe, params, 5.0)
  d = jax.jit(lambda x, t: denoise(x, t, c_val))
  plan = pipelines.plan_for(pipe, 3)
  theirs = sample(plan.solver, d, plan.init_scale * x_val, jnp.asarray(plan.ts, jnp.float32),
                  denoise_final=plan.denoise_final)
  rmse = lambda out: float(np.sqrt(np.mean((np.asarray(out, np.float64) - target_val) ** 2)))
  fitted = record["samplers"]["3"]["calib_rmse"]  # the validation batch's RMSE of the chosen fit
  print(f"tiny SD3, 3 evaluations: fitted {fitted:.3e}, FlowMatchEuler {rmse(theirs):.3e}")
  assert np.isfinite(fitted) and fitted < rmse(theirs)
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=None, height=SIZE, width=SIZE,
                           plan=calibrate.fitted_plan(pipe.process, path, key, 3), guidance_scale=5.0,
                           noise=x_val[: len(PROMPTS)])
  assert out.images.shape == (len(PROMPTS), SIZE, SIZE, 3) and np.all(np.isfinite(out.images))
