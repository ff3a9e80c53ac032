"""ControlNet pipelines: diffjax against diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline, and the
generation job's ControlNet fields.

Tiny random-weight models as in test_pipelines_parity.py: its SD pipeline (DDIM) and two ControlNets made from its
U-Net with diffusers' ``ControlNetModel.from_unet``, jiggled (zero convolutions included) and with the control-image
embedding's ``conv_out`` at O(1 / sqrt(fan_in)) (as after training), so that every residual and the control image
matter. diffusers' pipeline folders are saved with ``save_pretrained`` (the ControlNets in ``controlnet/`` and
``controlnet_1/``) and read by ``pipelines.from_pretrained`` and ``convert.load_controlnet``. Final images in [0, 1]
are compared for the same prompts, negative prompt, control images and initial latents, with classifier-free guidance.
The tolerance is test_pipelines_parity.py's ATOL = 1e-4: float32 rounding through the tiny U-Net, ControlNet and VAE
is ~1e-6 here (a ControlNet adds ~35 layers to the U-Net's ~40, each ~1e-6 relative), while what a wrong keep step,
scale or branch moves is above 1e-3 (each test checks that its setting changes the images by more than 10 x ATOL).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image
from reference_models import jiggle
from test_pipelines_parity import ATOL, PROMPTS, SIZE, _nhwc, _tiny_pipeline, _torch_draws

from configs import generate as generate_config
from diffjax import generation, images, pipelines
from diffjax import watermark as wm
from diffjax.convert import load_controlnet
from diffjax.pipelines import controlnet
from diffjax.schema import ConfigError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 5  # with start / end (0.1, 0.8) the first and the last of 5 steps run without the ControlNet
NEGATIVE = "blurry"  # one negative prompt for every prompt (the generation job's way)
GUIDANCE = 7.5
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW, as torch draws them


def _controlnet(unet, seed):
  """``ControlNetModel.from_unet`` of the tiny U-Net (control images at 2x the latents: the tiny VAE's factor)."""
  torch.manual_seed(seed)
  cn = jiggle(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed=seed)
  conv_out = cn.controlnet_cond_embedding.conv_out
  with torch.no_grad():
    conv_out.weight.normal_(0.0, conv_out.weight[0].numel() ** -0.5)
  return cn


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """diffusers' ControlNet pipelines (one and two ControlNets), their saved folders, and diffjax's loads of them."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's threads spin against XLA's on 2 busy cores: 40x slower at these sizes
  tmp = tmp_path_factory.mktemp("controlnet")
  sd, _ = _tiny_pipeline(tmp, "ddim")
  cns = [_controlnet(sd.unet, seed) for seed in (1, 2)]
  refs = {}
  for k, name in ((1, "one"), (2, "two")):
    refs[k] = diffusers.StableDiffusionControlNetPipeline(**sd.components, controlnet=cns[0] if k == 1 else cns)
    refs[k].set_progress_bar_config(disable=True)
    refs[k].save_pretrained(tmp / name)
  pipe, params = pipelines.from_pretrained(tmp / "one")  # the SD parts of a ControlNet pipeline folder
  nets = [load_controlnet(tmp / "two"), load_controlnet(tmp / "two" / "controlnet_1")]  # controlnet/, controlnet_1/
  rng = np.random.default_rng(0)
  hints = [rng.uniform(size=(len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32) for _ in cns]
  yield types.SimpleNamespace(
      sd=sd, refs=refs, tmp=tmp, pipe=pipe, params=params, nets=nets, hints=hints,
      latents=rng.standard_normal(LATENT).astype(np.float32),
      controlled={k: controlnet.with_controlnets(pipe, [n for n, _ in nets[:k]]) for k in (1, 2)},
      weights={k: [w for _, w in nets[:k]] for k in (1, 2)})
  torch.set_num_threads(threads)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _reference(ref_pipe, images, latents, **kw):
  """diffusers' images (B, H, W, 3) in [0, 1] for control ``images`` (one per ControlNet) and initial ``latents``."""
  with torch.no_grad():
    return ref_pipe(PROMPTS, image=[_nchw(i) for i in images] if len(images) > 1 else _nchw(images[0]),
                    negative_prompt=[NEGATIVE] * len(PROMPTS), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np", **kw).images


def _diffjax(m, k, control, **kw):
  """``controlnet.generate`` with k ControlNets, as ``_reference`` runs diffusers."""
  return controlnet.generate(m.controlled[k], {**m.params, "controlnet": m.weights[k]}, PROMPTS, control,
                             negative_prompts=[NEGATIVE], height=SIZE, width=SIZE,
                             plan=pipelines.plan_for(m.pipe, STEPS), guidance_scale=GUIDANCE, watermark=wm.NONE, **kw)


def _check(got, want, what):
  diff = float(np.max(np.abs(got - want)))
  print(f"{what}: max abs diff {diff:.2e}")
  assert got.shape == want.shape == (len(PROMPTS), SIZE, SIZE, 3)
  assert diff <= ATOL, f"{what}: {diff}"


def test_keep_schedule_is_diffusers():
  np.testing.assert_array_equal(controlnet.keep_schedule(5, [0.1, 0.0], [0.8, 1.0]),
                                [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  # diffusers' float64 comparisons: 3 / 10 < 0.3 is false, (6 + 1) / 10 > 0.7 is false
  np.testing.assert_array_equal(controlnet.keep_schedule(10, [0.3], [0.7])[0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])


def test_one_controlnet_with_scale_start_and_end(models):
  """StableDiffusionControlNetPipeline, one ControlNet at scale 0.7 acting from 10% to 80% of the steps."""
  m = models
  control = controlnet.Control([m.hints[0]], scales=0.7, start=0.1, end=0.8)
  ref = _reference(m.refs[1], m.hints[:1], m.latents, controlnet_conditioning_scale=0.7, control_guidance_start=0.1,
                   control_guidance_end=0.8)
  out = _diffjax(m, 1, control, noise=_nhwc(m.latents))
  _check(out.images, ref, "one ControlNet, scale 0.7, steps (0.1, 0.8)")
  assert out.record["control"] == {"scales": [0.7], "start": [0.1], "end": [0.8], "guess_mode": False}
  # The check has teeth: the ControlNet acting at every step moves the images by far more.
  every = _diffjax(m, 1, controlnet.Control([m.hints[0]], scales=0.7), noise=_nhwc(m.latents))
  assert float(np.max(np.abs(every.images - ref))) > 10 * ATOL


def test_guess_mode(models):
  """Guess mode: the residuals (guess-mode scales) for the prompts' branch only; the negative's gets none."""
  m = models
  ref = _reference(m.refs[1], m.hints[:1], m.latents, guess_mode=True)
  out = _diffjax(m, 1, controlnet.Control([m.hints[0]], guess_mode=True), noise=_nhwc(m.latents))
  _check(out.images, ref, "guess mode")
  plain = _diffjax(m, 1, controlnet.Control([m.hints[0]]), noise=_nhwc(m.latents))  # same program: guess mode traced
  assert float(np.max(np.abs(plain.images - ref))) > 10 * ATOL


def test_two_controlnets(models):
  """MultiControlNetModel: two ControlNets with their own images, scales and step ranges, residuals summed."""
  m = models
  scales, start, end = [0.7, 1.3], [0.0, 0.2], [1.0, 0.9]
  ref = _reference(m.refs[2], m.hints, m.latents, controlnet_conditioning_scale=scales, control_guidance_start=start,
                   control_guidance_end=end)
  out = _diffjax(m, 2, controlnet.Control(m.hints, scales, start, end), noise=_nhwc(m.latents))
  _check(out.images, ref, "two ControlNets, scales (0.7, 1.3)")
  swapped = _diffjax(m, 2, controlnet.Control(m.hints, scales[::-1], start, end), noise=_nhwc(m.latents))
  assert float(np.max(np.abs(swapped.images - ref))) > 10 * ATOL


def _job_config(m, tmp_path, **fields):
  config = generate_config.get_config("tiny")
  config.update(dict(pretrained=str(m.tmp / "one"), height=SIZE, width=SIZE, prompts=tuple(PROMPTS),
                     negative_prompt=NEGATIVE, batch_size=len(PROMPTS), watermark="none", compilation_cache=""))
  config.sampler.steps = STEPS
  config.update(fields)
  return config


def _png(array, path):
  Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path)
  return str(path)


def test_generation_job(models, tmp_path):
  """configs/generate.py with a ControlNet (the pipeline folder's controlnet/), a control image file, scale, steps:
  the images of ``controlnet.generate`` with the same settings, and a record naming the ControlNet and its file."""
  m = models
  hint = _png(m.hints[0][0], tmp_path / "edges.png")
  config = _job_config(m, tmp_path, controlnet=(str(m.tmp / "one"),), control_image=(hint,), controlnet_scale=(0.7,),
                       control_start=(0.1,), control_end=(0.8,))
  record = generation.generate(config, str(tmp_path / "out"))
  on_disk = json.loads((tmp_path / "out" / "generation.json").read_text())
  assert on_disk == record and record["control"] == {"scales": [0.7], "start": [0.1], "end": [0.8],
                                                     "guess_mode": False}
  (cn,) = record["controlnet"]
  weights = "controlnet/diffusion_pytorch_model.safetensors"
  assert cn["path"] == str(m.tmp / "one") and cn["control_image"] == hint
  assert cn["weights_sha256"] == {weights: generation._sha256(str(m.tmp / "one" / weights))}
  assert cn["control_image_sha256"] == generation._sha256(hint)
  read = np.asarray(Image.open(hint), np.float32) / 255.0
  want = _diffjax(m, 1, controlnet.Control([read], 0.7, 0.1, 0.8), seed=[0, 1]).images
  got = np.load(tmp_path / "out" / "samples.npz")["images"]
  np.testing.assert_array_equal(got, images.to_uint8(want, 0.0, 1.0))


def test_control_image_file_reads_as_diffusers(tmp_path):
  """The job reads a control image file as diffusers' control_image_processor reads the PIL image: a grey edge map
  of another size resized (Lanczos) and made RGB, in [0, 1]."""
  from diffusers.image_processor import VaeImageProcessor

  grey = (np.random.default_rng(4).uniform(size=(20, 24)) > 0.7).astype(np.uint8) * 255
  Image.fromarray(grey, "L").save(tmp_path / "edges.png")
  processor = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False)
  with Image.open(tmp_path / "edges.png") as pil:
    want = processor.preprocess(pil, height=SIZE, width=SIZE)[0].permute(1, 2, 0).numpy()
  got = generation.control_image(str(tmp_path / "edges.png"), SIZE, SIZE)
  assert got.shape == want.shape == (SIZE, SIZE, 3)
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_bad_input(models, tmp_path):
  m = models
  hint = _png(m.hints[0][0], tmp_path / "edges.png")
  job = lambda **fields: generation.generate(_job_config(m, tmp_path, **fields), str(tmp_path / "out"))
  cn = (str(m.tmp / "one"),)
  with pytest.raises(ConfigError, match=r"config.control_image = \(\) is invalid: expected one image file per "):
    job(controlnet=cn)
  with pytest.raises(ConfigError, match=r"config.controlnet_scale = \(0.5, 0.5\) is invalid"):
    job(controlnet=cn, control_image=(hint,), controlnet_scale=(0.5, 0.5))
  with pytest.raises(ConfigError, match=r"config.control_end = \(0.1,\) is invalid: expected after control_start"):
    job(controlnet=cn, control_image=(hint,), control_start=(0.5,), control_end=(0.1,))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ConfigError, match=r"config.control_image: .*broken.png is not a readable image"):
    job(controlnet=cn, control_image=(str(tmp_path / "broken.png"),))
  with pytest.raises(ConfigError, match=r"config.controlnet: .*nowhere does not exist"):
    job(controlnet=(str(tmp_path / "nowhere"),), control_image=(hint,))
  with pytest.raises(ConfigError, match="config.controlnet: .*not a diffusers ControlNetModel"):
    job(controlnet=(str(m.tmp / "one" / "unet"),), control_image=(hint,))
  torch.manual_seed(0)
  other = diffusers.ControlNetModel(block_out_channels=(16, 24), layers_per_block=1, cross_attention_dim=24,
                                    norm_num_groups=8, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    conditioning_embedding_out_channels=(8, 16))
  other.save_pretrained(tmp_path / "other")
  with pytest.raises(ConfigError, match=r"config.controlnet: .*other is a ControlNet for another U-Net: "
                                        r"block_out_channels \(16, 24\) \(the U-Net's \(16, 32\)\); "
                                        r"cross_attention_dim 24 \(the U-Net's 32\)"):
    job(controlnet=(str(tmp_path / "other"),), control_image=(hint,))
  with pytest.raises(ConfigError, match="config.controlnet: ControlNets steer txt2img, img2img and inpaint"):
    job(controlnet=cn, control_image=(hint,), task="upscale", init_image=hint)
  # The library's own checks.
  params = {**m.params, "controlnet": m.weights[1]}
  run = lambda control, **kw: controlnet.generate(m.controlled[1], {**params, **kw}, PROMPTS, control, height=SIZE,
                                                  width=SIZE, plan=pipelines.plan_for(m.pipe, STEPS))
  with pytest.raises(ValueError, match="2 control images for 1 ControlNets"):
    run(controlnet.Control(m.hints))
  with pytest.raises(ValueError, match=r"control image 0 is 8 x 8, the output 16 x 16"):
    run(controlnet.Control([m.hints[0][:, :8, :8]]))
  with pytest.raises(ValueError, match=r"start / end of ControlNet 0 are 0.5 / 0.5"):
    run(controlnet.Control([m.hints[0]], start=0.5, end=0.5))
  with pytest.raises(ValueError, match="Control.scales has 2 values for 1 ControlNets"):
    run(controlnet.Control([m.hints[0]], scales=[1.0, 0.5]))
  with pytest.raises(ValueError, match="ControlNet 0 is for another U-Net: block_out_channels"):
    run(controlnet.Control([m.hints[0]]), controlnet=[load_controlnet(tmp_path / "other")[1]])
  with pytest.raises(ValueError, match="network takes no ControlNet residuals"):
    controlnet.with_controlnets(pipelines.Pipeline(tokenize=None, encode_text=None, predict=lambda p, x, t, c: x,
                                                   process=m.pipe.process, target="eps", latent_channels=4),
                                [m.nets[0][0]])


@pytest.mark.slow
def test_img2img_matches_diffusers(models):
  """StableDiffusionControlNetImg2ImgPipeline at strength 0.6: the keep schedule over the steps that run."""
  m = models
  ref_pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(**m.refs[1].components)
  ref_pipe.set_progress_bar_config(disable=True)
  init = np.random.default_rng(3).uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, image=_nchw(init), control_image=_nchw(m.hints[0]), strength=0.6,
                   negative_prompt=[NEGATIVE] * len(PROMPTS),
                   num_inference_steps=8, guidance_scale=GUIDANCE, controlnet_conditioning_scale=0.7,
                   control_guidance_start=0.1, control_guidance_end=0.8, output_type="np",
                   generator=torch.Generator().manual_seed(11)).images
  posterior, noise = _torch_draws(11, LATENT, 2)
  run = lambda control: controlnet.generate(
      m.controlled[1], {**m.params, "controlnet": m.weights[1]}, PROMPTS, control, negative_prompts=[NEGATIVE],
      height=SIZE, width=SIZE, plan=pipelines.plan_for(m.pipe, 8), guidance_scale=GUIDANCE, image=init, strength=0.6,
      noise=_nhwc(noise), image_noise=_nhwc(posterior), watermark=wm.NONE)
  out = run(controlnet.Control([m.hints[0]], 0.7, 0.1, 0.8))
  assert out.record["first_step"] == 4  # 8 - int(8 * 0.6): diffusers' keep runs over the last 4 steps
  _check(out.images, ref, "img2img, strength 0.6")
  every = run(controlnet.Control([m.hints[0]], 0.7))
  assert float(np.max(np.abs(every.images - ref))) > 10 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("channels", [9, 4])
def test_inpaint_matches_diffusers(models, channels):
  """StableDiffusionControlNetInpaintPipeline: a 9-channel U-Net (the ControlNet sees the latents alone, the U-Net
  the mask and masked image too) and a 4-channel one (blended)."""
  from test_pipelines_inpaint import _draws

  m = models
  torch.manual_seed(1)
  unet = m.sd.unet if channels == 4 else jiggle(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8), seed=1)
  ref_pipe = diffusers.StableDiffusionControlNetInpaintPipeline(**dict(m.refs[1].components, unet=unet))
  ref_pipe.set_progress_bar_config(disable=True)
  ref_pipe.save_pretrained(m.tmp / f"inpaint{channels}")
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32)
  mask = rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 1)).astype(np.float32)
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, image=_nchw(image), mask_image=_nchw(mask), control_image=_nchw(m.hints[0]),
                   negative_prompt=[NEGATIVE] * len(PROMPTS), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, controlnet_conditioning_scale=0.7, control_guidance_start=0.1,
                   control_guidance_end=0.8, latents=torch.from_numpy(m.latents), output_type="np",
                   generator=torch.Generator().manual_seed(11)).images
  noise, image_noise = _draws(channels, 1.0, m.latents)
  pipe, params = pipelines.from_pretrained(m.tmp / f"inpaint{channels}")
  assert isinstance(pipe, pipelines.InpaintingPipeline) == (channels == 9)
  run = lambda scale: controlnet.inpaint(
      controlnet.with_controlnets(pipe, [m.nets[0][0]]), {**params, "controlnet": m.weights[1]}, PROMPTS, image, mask,
      controlnet.Control([m.hints[0]], scale, 0.1, 0.8), negative_prompts=[NEGATIVE], height=SIZE, width=SIZE,
      plan=pipelines.plan_for(pipe, STEPS), guidance_scale=GUIDANCE, noise=noise, image_noise=image_noise,
      watermark=wm.NONE)
  out = run(0.7)
  assert out.record["mode"] == ("conditioned" if channels == 9 else "blended")
  _check(out.images, ref, f"inpaint, {channels}-channel U-Net")
  assert float(np.max(np.abs(run(0.0).images - ref))) > 10 * ATOL  # the ControlNet matters
