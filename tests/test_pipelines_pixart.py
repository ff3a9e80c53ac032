"""PixArt-alpha / PixArt-Sigma: diffjax against diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline.

Each folder holds a T5 encoder (with a tokenizer trained in the test), a PixArt transformer with a
learned variance (out_channels 8 for 4 latent channels), a 16-pixel VAE with PixArt's scaling factor and
a scheduler. Alpha's transformer has sample_size 128, so that its pipeline passes the image size and
aspect ratio (``added_cond_kwargs``); Sigma's has 32 (the 256 px bin table). Images in [0, 1] for the
same prompts, negative prompts and initial latents, with the folder's default T5 lengths (120 and 300
tokens: the masks matter, most tokens are padding) and classifier-free guidance 4.5, must agree within
test_pipelines_parity's 1e-4. Float32 rounding through T5 (2 layers), PixArt (2 blocks) and the VAE (~20
layers) is about sqrt(n) 2**-24 ~ 1e-6 relative per layer (contractions of n <= 288 terms); accumulated
over ~30 layers, amplified at most x(2 x 4.5 + 1) by the guidance's difference of two branches and carried
through 5 steps it stays near 1e-5, an order of magnitude under the tolerance, while a wrong mask or image
size moves the network's prediction by ~0.1 of its scale here and another guidance scale moves the images
by > 1e-3 (checked below). diffusers runs with ``clean_caption=False`` (diffjax uses prompts as given) and
``use_resolution_binning=False``, except in the binning test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from test_pipelines_parity import ATOL, NEGATIVE, PROMPTS, SIZE, _nhwc, _perturb
from test_tokenizers import T5_CORPUS, write_t5_tokenizer

from diffjax import pipelines
from diffjax.pipelines import pixart
from diffjax.watermark import NONE

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 5  # divides 1000: DDIM's leading grid steps to its next timestep
GUIDANCE = 4.5  # the PixArt pipelines' default
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW; the tiny VAE downsamples by 2
KINDS = {"alpha": ("PixArtAlphaPipeline", 128), "sigma": ("PixArtSigmaPipeline", 32)}  # class, sample_size
SCHEDULERS = {"dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(),  # PixArt's: linear betas, linspace
              "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False)}


@pytest.fixture(scope="module", params=list(KINDS))
def reference(request, tmp_path_factory):
  """(kind, diffusers pipeline with the default DPMSolverMultistepScheduler, its saved folder): tiny, random."""
  kind = request.param
  cls, sample_size = KINDS[kind]
  root = tmp_path_factory.mktemp(kind)
  torch.manual_seed(0)
  write_t5_tokenizer(str(root), T5_CORPUS + PROMPTS + NEGATIVE)
  tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token="</s>",
                                           pad_token="<pad>", unk_token="<unk>", extra_ids=0)
  t5 = _perturb(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)))
  transformer = _perturb(diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
      cross_attention_dim=24, sample_size=sample_size, patch_size=2, caption_channels=32))
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
      sample_size=SIZE, scaling_factor=0.13025), scale=0.02)
  ref = getattr(diffusers, cls)(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                scheduler=SCHEDULERS["dpmpp_2m"]())
  ref.set_progress_bar_config(disable=True)
  # Saved after a call, as a folder of a pipeline that has run: tokenizer.json then keeps that call's padding.
  tokenizer(PROMPTS, padding="max_length", max_length=7, truncation=True)
  ref.save_pretrained(root / kind)
  assert json.loads((root / kind / "tokenizer" / "tokenizer.json").read_text())["padding"] is not None
  return kind, ref, root / kind


def _run(ref_pipe, latents, guidance_scale=GUIDANCE, **kw):
  with torch.no_grad():
    return ref_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                    latents=torch.from_numpy(latents), clean_caption=False, output_type="np", **kw).images


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_pixart_txt2img_matches_diffusers(reference, scheduler, tmp_path):
  kind, ref_pipe, _ = reference
  ref_pipe = type(ref_pipe)(**(ref_pipe.components | {"scheduler": SCHEDULERS[scheduler]()}))
  ref_pipe.set_progress_bar_config(disable=True)
  ref_pipe.save_pretrained(tmp_path / kind)
  pipe, params = pipelines.from_pretrained(tmp_path / kind)
  assert isinstance(pipe, pixart.PixArtPipeline) and pipe.scheduler.class_name == type(ref_pipe.scheduler).__name__
  assert pipe.max_length == {"alpha": 120, "sigma": 300}[kind]  # diffusers' max_sequence_length defaults
  latents = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)
  ref = _run(ref_pipe, latents, height=SIZE, width=SIZE, use_resolution_binning=False)
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                           plan=pipelines.plan_for(pipe, STEPS), guidance_scale=GUIDANCE, noise=_nhwc(latents))
  assert out.images.shape == ref.shape == (2, SIZE, SIZE, 3)
  diff = float(np.abs(out.images - ref).max())
  print(f"pixart {kind} {scheduler} txt2img max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  # The check has teeth: another guidance scale (traced: no recompilation) moves the images by far more.
  other = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                             plan=pipelines.plan_for(pipe, STEPS), guidance_scale=3.0, noise=_nhwc(latents))
  assert float(np.abs(other.images - ref).max()) > 10 * ATOL


def test_pixart_long_prompt_truncated_as_diffusers(reference, caplog):
  """A prompt over T5's length: the same ids and mask as diffusers' tokenizer call (``</s>`` kept last), a
  warning, and the same T5 states (float32 rounding of two T5 layers: well under 1e-5 of their scale)."""
  kind, ref_pipe, folder = reference
  pipe, params = pixart.pixart_from_pretrained(folder)
  length = pipe.max_length
  long = " ".join(T5_CORPUS[:6]) * 10
  want = ref_pipe.tokenizer(long, padding="max_length", max_length=length, truncation=True, return_tensors="np")
  assert pipe.count_tokens(long) > length
  ids, mask = pipe.tokenize_checked([long])
  assert f"truncated to the tokenizer's {length}" in caplog.text
  np.testing.assert_array_equal(ids, want.input_ids)
  np.testing.assert_array_equal(mask, want.attention_mask)
  assert ids.shape == (1, length) and ids[0, -1] == ref_pipe.tokenizer.eos_token_id and mask.all()
  with torch.no_grad():
    states = ref_pipe.encode_prompt(long, do_classifier_free_guidance=False, clean_caption=False,
                                    max_sequence_length=length)[0].numpy()
  got, got_mask = pipe.encode_text(params, ids, mask)
  np.testing.assert_allclose(np.asarray(got), states, rtol=0, atol=1e-5 * float(np.abs(states).max()))
  np.testing.assert_array_equal(np.asarray(got_mask), mask)
  # a shorter length given to the loader truncates the same way as diffusers' max_sequence_length
  short, _ = pixart.pixart_from_pretrained(folder, max_sequence_length=7)[0].tokenize([long])
  np.testing.assert_array_equal(short[0], ref_pipe.tokenizer(long, max_length=7, truncation=True).input_ids)


SIZES = [(1024, 1024), (768, 1360), (1360, 768), (1000, 1000), (500, 2000), (2000, 500), (123, 4567), (4567, 123),
         (640, 1280), (1280, 640), (1, 1), (333, 512), (720, 1280), (1080, 1920), (1920, 1080), (96, 97)]


def test_resolution_bins_match_diffusers():
  """The bin tables are diffusers' (keys as ratios, values as sizes, in order), and the bin picked for a size
  is the one ``classify_height_width_bin`` picks; sizes include exact ratios and points between bins."""
  from diffusers.image_processor import PixArtImageProcessor
  from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
  from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma
  tables = {256: alpha.ASPECT_RATIO_256_BIN, 512: alpha.ASPECT_RATIO_512_BIN, 1024: alpha.ASPECT_RATIO_1024_BIN,
            2048: sigma.ASPECT_RATIO_2048_BIN}
  rng = np.random.default_rng(0)
  sizes = SIZES + [tuple(int(v) for v in rng.integers(64, 4096, 2)) for _ in range(200)]
  for size, table in tables.items():
    bins = pixart.aspect_ratio_bins(size)
    assert bins == tuple((float(k), (int(h), int(w))) for k, (h, w) in table.items())
    for height, width in sizes:
      assert pixart.resolution_bin(bins, height, width) == PixArtImageProcessor.classify_height_width_bin(
          height, width, ratios=table), (size, height, width)
  assert pixart.BIN_TABLES["PixArtAlphaPipeline"].keys() == {32, 64, 128}  # alpha has no 2048 px table
  with pytest.raises(ValueError, match="bin tables"):
    pixart.aspect_ratio_bins(768)


@pytest.mark.parametrize("shape,target", [((16, 32), (20, 36)), ((64, 48), (40, 40)), ((24, 24), (24, 24)),
                                          ((32, 16), (70, 30)), ((1088, 960), (1100, 1000))])
def test_resize_and_crop_matches_diffusers(shape, target):
  """Bilinear resize (up and down) and centre crop as diffusers' ``resize_and_crop_tensor``.

  Each output is a convex combination of two by two pixels at float32 source positions: torch rounds a
  position once (an FMA) or twice (without), so positions may differ by an ulp of the input size on
  another CPU, which moves an output by at most that times the range of the pixels, per axis; plus a few
  roundings of the blend."""
  from diffusers.image_processor import PixArtImageProcessor
  images = np.random.default_rng(1).uniform(-1.5, 1.5, (1,) + shape + (3,)).astype(np.float32)
  want = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(images.transpose(0, 3, 1, 2)), target[1],
                                                     target[0]).numpy().transpose(0, 2, 3, 1)
  got = pixart.resize_and_crop(images, *target)
  assert got.shape == want.shape == (1,) + target + (3,)
  ulp = 2.0**-23 * 2.0 ** np.ceil(np.log2(max(shape)))
  bound = 2 * ulp * float(np.ptp(images)) + 8 * 2.0**-24 * float(np.abs(images).max())
  diff = float(np.abs(got - want).max())
  print(f"resize_and_crop {shape} -> {target} max abs diff {diff:.2e} (bound {bound:.1e})")
  assert diff <= bound, (diff, bound)


def test_resize_and_crop_never_short():
  """Where diffusers' int(224 * (230 / 224)) = 229 leaves the resized side a pixel short (its crop then keeps
  one row), the images still come out at the size asked for."""
  images = np.zeros((1, 224, 224, 3), np.float32)
  assert int(224 * (230 / 224)) == 229
  assert pixart.resize_and_crop(images, 230, 200).shape == (1, 230, 200, 3)


@pytest.mark.parametrize("reference", ["sigma"], indirect=True)  # the binning code is the same for alpha
def test_pixart_binned_generation_matches_diffusers(reference, monkeypatch):
  """Resolution binning end to end: diffusers' 256 px table (Sigma's sample_size 32; alpha's 128 picks the 1024
  px one) replaced by small bins on both sides; 20 x 36 px asked for, generated at the 16 x 32 bin, resized to
  20 x 40 and cropped. Same tolerance as txt2img (the resize is a convex combination: no amplification)."""
  kind, ref_pipe, folder = reference
  table = {"0.5": [16.0, 32.0], "1.0": [16.0, 16.0], "2.0": [32.0, 16.0]}
  from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma
  monkeypatch.setattr(pipeline_pixart_sigma, "ASPECT_RATIO_256_BIN", table)
  latents = np.random.default_rng(2).standard_normal((len(PROMPTS), 4, 8, 16)).astype(np.float32)
  ref = _run(ref_pipe, latents, height=20, width=36, use_resolution_binning=True)
  pipe, params = pipelines.from_pretrained(folder)
  assert pipe.bins == pixart.aspect_ratio_bins(256) and pipe.default_size == 64
  pipe = dataclasses.replace(pipe, bins=tuple((float(k), (int(h), int(w))) for k, (h, w) in table.items()))
  out = pixart.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=20, width=36,
                        plan=pipelines.plan_for(pipe, STEPS), guidance_scale=GUIDANCE, noise=_nhwc(latents),
                        watermark=NONE)
  assert out.images.shape == ref.shape == (2, 20, 36, 3) and out.record["resolution_bin"] == [16, 32]
  assert out.latents.shape == (2, 8, 16, 4)
  diff = float(np.abs(out.images - ref).max())
  print(f"pixart {kind} binned txt2img max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  with pytest.raises(ValueError, match="txt2img only"):
    pixart.generate(pipe, params, PROMPTS, height=20, width=36, image=np.zeros((20, 36, 3), np.float32))


def test_pixart_folder_errors(reference, tmp_path):
  """A PixArt class the loader does not take (PAG), and a folder without its T5 encoder, are refused by name."""
  _, _, folder = reference
  shutil.copytree(folder, tmp_path / "pag")
  index = json.loads((tmp_path / "pag" / "model_index.json").read_text())
  (tmp_path / "pag" / "model_index.json").write_text(json.dumps(index | {"_class_name": "PixArtSigmaPAGPipeline"}))
  with pytest.raises(NotImplementedError, match="PixArtSigmaPAGPipeline is not supported"):
    pipelines.from_pretrained(tmp_path / "pag")
  (tmp_path / "pag" / "model_index.json").write_text(json.dumps(index | {"text_encoder": [None, None]}))
  with pytest.raises(ValueError, match="lacks text_encoder"):
    pipelines.from_pretrained(tmp_path / "pag")
