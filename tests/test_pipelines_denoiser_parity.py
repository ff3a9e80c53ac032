"""Per-step parity: every network evaluation and every guided prediction of a diffusers run, in diffjax.

diffusers' U-Net is wrapped to record each call (its input latents, timestep, text embeddings
and output) during a StableDiffusionPipeline run with CFG, negative prompts and
``guidance_rescale``. At each recorded step diffjax evaluates, on the same latents and time,
(1) the raw network and (2) its guided denoiser, turned back into the network's target; (2)
is compared with diffusers' guided (and rescaled: its own ``rescale_noise_cfg``) prediction.
The raw outputs are unit-scale: float32 rounding through the tiny U-Net is ~1e-6 relative, so
1e-4 bounds them (measured 2.5e-6). diffjax guides on x0 = (x - sigma eps) / alpha and turns the
result back into eps or v, so its rounding of x is divided by sigma(t) and amplified by the CFG
(1 + 2 g): the guided bound adds (1 + 2 g) gamma_16 max|x| / sigma(t) to 1e-4 (measured 3e-4 at
sigma = 0.04, 1e-5 elsewhere).
The end-to-end images with ``guidance_rescale`` must match too, for epsilon and v-prediction
(diffusers rescales the raw output, so v for a v model).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_pipelines_parity import ATOL, NEGATIVE, PROMPTS, SIZE, _nhwc, _tiny_pipeline
from tolerances import gamma

from diffjax import parameterization, pipelines

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SCALE, RESCALE, STEPS = 7.5, 0.7, 6
GUIDED_OPS = 16  # roundings between the two network outputs and the guided target: x0 <-> target, CFG, rescale


def _recorded_run(ref_pipe, latents):
  """(images, [(latents NCHW (2B), timestep, text embeddings (2B), output NCHW (2B))]) of a diffusers run."""
  calls, forward = [], ref_pipe.unet.forward

  def record(sample, timestep, encoder_hidden_states, **kw):
    out = forward(sample, timestep, encoder_hidden_states, **kw)
    calls.append((sample.numpy().copy(), float(timestep), encoder_hidden_states.numpy().copy(),
                  out[0].numpy().copy()))
    return out

  ref_pipe.unet.forward = record
  with torch.no_grad():
    images = ref_pipe(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      guidance_scale=SCALE, guidance_rescale=RESCALE, latents=torch.from_numpy(latents),
                      output_type="np").images
  ref_pipe.unet.forward = forward
  return images, calls


@pytest.mark.parametrize("scheduler,prediction", [pytest.param("ddim", "epsilon", marks=pytest.mark.slow),
                                                  ("dpmpp_2m", "v_prediction")])
def test_every_step_and_the_images_match_diffusers(tmp_path, scheduler, prediction):
  ref_pipe, folder = _tiny_pipeline(tmp_path, scheduler, prediction_type=prediction)
  latents = np.random.default_rng(0).standard_normal((len(PROMPTS), 4, SIZE // 2, SIZE // 2)).astype(np.float32)
  ref_images, calls = _recorded_run(ref_pipe, latents)
  assert len(calls) == STEPS
  pipe, params = pipelines.from_pretrained(folder)
  ids, mask = pipe.tokenize(PROMPTS)
  neg_ids, neg_mask = pipe.tokenize(NEGATIVE)
  context, negative = pipe.encode_text(params, ids, mask), pipe.encode_text(params, neg_ids, neg_mask)
  guided = pipelines.denoiser(pipe, params, context, negative, SCALE, pipelines.Guidance(rescale=RESCALE))
  b = len(PROMPTS)
  net_err = guided_err = 0.0
  for sample, t, embeddings, out in calls:
    x = jnp.asarray(_nhwc(sample))
    # diffusers batches [negative, positive]; its embeddings are diffjax's text encodings
    np.testing.assert_allclose(embeddings, np.concatenate([negative, context]), rtol=0, atol=ATOL)
    raw = pipe.predict(params, x, jnp.full((2 * b,), t), jnp.asarray(embeddings))
    net_err = max(net_err, float(np.abs(np.asarray(raw) - _nhwc(out)).max()))
    u, c = np.split(_nhwc(out), 2)
    ref = rescale_noise_cfg(torch.from_numpy(u + SCALE * (c - u)), torch.from_numpy(c), RESCALE).numpy()
    x0 = guided(x[b:], jnp.float32(t))
    ours = parameterization.from_x0(pipe.target, x0, x[b:], jnp.float32(t), pipe.process)
    # diffjax guides on x0 and turns it back: rounding of x (|x|) divided by sigma, amplified by the CFG.
    bound = ATOL + (1 + 2 * SCALE) * gamma(GUIDED_OPS) * float(np.abs(sample).max()) / float(
        pipe.process.sigma(jnp.float32(t)))
    guided_err = max(guided_err, float(np.abs(np.asarray(ours) - ref).max()) / bound)
  print(f"{scheduler}/{prediction}: network {net_err:.2e}, guided {guided_err:.2f} of its bound")
  assert net_err <= ATOL and guided_err <= 1.0
  out = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                           plan=pipelines.plan_for(pipe, STEPS), guidance_scale=SCALE,
                           guidance=pipelines.Guidance(rescale=RESCALE), noise=_nhwc(latents))
  diff = float(np.abs(out.images - ref_images).max())
  plain = pipelines.generate(pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                             plan=pipelines.plan_for(pipe, STEPS), guidance_scale=SCALE, noise=_nhwc(latents))
  print(f"images {diff:.2e}; without the rescale {float(np.abs(plain.images - ref_images).max()):.2e}")
  assert diff <= ATOL
  assert float(np.abs(plain.images - ref_images).max()) > 10 * ATOL  # the rescale matters at this scale
