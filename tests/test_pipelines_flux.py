"""FLUX.1: diffjax against diffusers' FluxPipeline on one tiny random-weight folder (dev and schnell).

The folder holds CLIP-L (its pooled state only), T5, a Flux transformer with one double and one
single block, a 16-pixel VAE with a shift factor, the flow-matching Euler scheduler with Flux's dynamic
shift, a CLIP tokenizer from a small BPE vocabulary and a T5 tokenizer trained in the test. The same
initial noise (packed on diffusers' side, NHWC on diffjax's) must give the same [0, 1] images within
test_pipelines_parity's 1e-4, with the guidance scale as the network's input (dev) or without (schnell).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_pipelines_parity import ATOL, PROMPTS, SIZE, _nhwc, _perturb
from test_tokenizers import CORPUS, T5_CORPUS, write_clip_files, write_t5_tokenizer

from diffjax import pipelines
from diffjax.models.flux import pack_latents
from diffjax.pipelines.flux import flux_from_pretrained

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 4
T5_LENGTH = 12
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW; the tiny VAE downsamples by 2
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def _folder(root, guidance: bool):
  torch.manual_seed(0)
  vocab, files = write_clip_files(str(root), CORPUS + PROMPTS)
  write_t5_tokenizer(str(root), T5_CORPUS + PROMPTS)
  t5_tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>", extra_ids=0)
  clip = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"])))
  t5 = _perturb(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=t5_tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)))
  transformer = _perturb(diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)))
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
      sample_size=SIZE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
      use_post_quant_conv=False), scale=0.02)
  ref = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                               text_encoder=clip, tokenizer=transformers.CLIPTokenizer(*files, model_max_length=16),
                               text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
  ref.set_progress_bar_config(disable=True)
  ref.save_pretrained(root / "flux")
  return ref


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_txt2img_matches_diffusers(tmp_path, guidance):
  ref_pipe = _folder(tmp_path, guidance)
  assert type(pipelines.from_pretrained(tmp_path / "flux")[0]).__name__ == "Pipeline"
  pipe, params = flux_from_pretrained(tmp_path / "flux", max_sequence_length=T5_LENGTH)
  latents = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)
  packed = np.asarray(pack_latents(_nhwc(latents)))

  def reference(scale=3.5):
    with torch.no_grad():
      return ref_pipe(PROMPTS, height=SIZE, width=SIZE, guidance_scale=scale, num_inference_steps=STEPS,
                      latents=torch.from_numpy(packed), max_sequence_length=T5_LENGTH, output_type="np").images

  ref = reference()
  plan = pipelines.plan_for(pipe, STEPS, height=SIZE, width=SIZE)
  out = pipelines.generate(pipe, params, PROMPTS, height=SIZE, width=SIZE, plan=plan, guidance_scale=3.5,
                           noise=_nhwc(latents))
  assert out.images.shape == ref.shape == (2, SIZE, SIZE, 3)
  diff = float(np.abs(out.images - ref).max())
  print(f"flux txt2img[guidance={guidance}] max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  if guidance:  # the check has teeth: the embedded scale moves the images by far more than the tolerance
    assert float(np.abs(reference(1.5) - out.images).max()) > 10 * ATOL
    with pytest.raises(ValueError, match="no negative prompt"):
      pipelines.generate(pipe, params, PROMPTS, negative_prompts=["a dog", "blurry"], height=SIZE, width=SIZE,
                         plan=plan, guidance_scale=3.5, noise=_nhwc(latents))
  with pytest.raises(ValueError, match="height=, width="):
    pipelines.plan_for(pipe, STEPS)
