"""Host-side generation: prompts (and an image) -> images, one compiled program per task and solver.

``generate(pipe, params, prompts, ...)`` tokenizes, draws the noise from a seed (or takes
it), picks the sampling ``Plan`` (the folder's scheduler, or any diffjax solver and grid
by name), runs the jitted task function of ``core`` and returns images in [0, 1] with a
record of everything needed to reproduce them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import watermark as wm
from diffjax.pipelines import core, programs
from diffjax.pipelines.schedulers import Plan
from diffjax.samplers import make_solver


def plan_for(pipe: core.Pipeline, num_steps: int = 50, sampler: str | None = None, grid: str = "karras", *,
             height: int | None = None, width: int | None = None, **options) -> Plan:
  """The folder's scheduler for ``num_steps`` (``sampler=None``), else diffjax's ``sampler`` on ``grid``
  within ``num_steps`` denoiser evaluations. A flow scheduler that shifts with the image size (Flux's)
  needs ``height`` and ``width``: its shift follows the packed 2 x 2 latent tokens, and it runs on the
  sigmas linspace(1, 1 / N, N) that FluxPipeline passes."""
  if sampler is None:
    if pipe.scheduler is None:
      raise ValueError("this pipeline names no scheduler: choose a diffjax sampler (e.g. sampler='dpmpp_2m')")
    if options:
      raise ValueError(f"solver options {sorted(options)} need a diffjax sampler name")
    if getattr(pipe.scheduler, "dynamic_shift", False):
      if height is None or width is None:
        raise ValueError("this scheduler's shift depends on the image size: pass plan_for(..., height=, width=)")
      f = 2 * pipe.downsample
      mu = pipe.scheduler.mu_for((height // f) * (width // f))
      return pipe.scheduler.plan(num_steps, mu=mu, sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))
    return pipe.scheduler.plan(num_steps)
  return Plan.native(pipe.process, sampler, num_steps, grid, **options)


@dataclasses.dataclass
class Output:
  """images: float32 (B, H, W, C) in [0, 1]; latents: what the sampler returned; record: JSON-ready."""

  images: np.ndarray
  latents: np.ndarray
  record: dict


def solver_for(pipe: core.Pipeline, name: str, options: tuple, custom=None):
  """``custom`` (``Plan.custom_solver``) when set, else the registered solver ``name`` with ``options``."""
  return custom if custom is not None else make_solver(name, pipe.process, **dict(options))


@functools.lru_cache(maxsize=32)
def _program(pipe: core.Pipeline, task: str, name: str, options: tuple, denoise_final: bool, guidance: core.Guidance,
             custom=None):
  """One jitted program per (pipeline, task, solver, final jump, guidance options); grids and scales are traced."""
  fn = core.txt2img if task == "txt2img" else core.img2img
  return programs.program(pipe, functools.partial(fn, pipe, solver=solver_for(pipe, name, options, custom),
                                                  denoise_final=denoise_final, options=guidance, decode=False),
                          task, name, options, denoise_final, guidance)


@functools.lru_cache(maxsize=8)
def _decoder(pipe: core.Pipeline):
  return programs.program(pipe, pipe.decode, "decode")


@functools.lru_cache(maxsize=8)
def _encoder(pipe: core.Pipeline):
  return programs.program(pipe, pipe.encode_image, "encode_image")


def _as_list(prompts, what: str) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{what} must be a non-empty list of strings, got {prompts!r}")
  return prompts


def _check_image(image, height: int, width: int, channels: int, what: str = "init image") -> np.ndarray:
  """(B, H, W, channels) float32 of a (B, H, W, channels) or (H, W, channels) float image in [0, 1] of the output's
  size (checked; ``what`` names it in errors)."""
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != channels:
    raise ValueError(f"{what} must be (B, H, W, {channels}) or (H, W, {channels}), got shape {image.shape}")
  if image.shape[1:3] != (height, width):
    raise ValueError(f"{what} is {image.shape[1]} x {image.shape[2]}, the output {height} x {width}: resize it")
  if not np.issubdtype(image.dtype, np.floating) or image.min() < 0.0 or image.max() > 1.0:
    raise ValueError(f"{what} must be float in [0, 1] (diffjax.images.load_image reads a file so)")
  return image.astype(np.float32)


def image_seeds(seed: int | Sequence[int], count: int) -> list[int]:
  """``count`` seeds: ``seed + i`` for one int, else the given ones (checked: one per image, non-negative ints)."""
  seeds = [int(seed) + i for i in range(count)] if isinstance(seed, int | np.integer) else list(seed)
  if len(seeds) != count or not all(isinstance(s, int | np.integer) and 0 <= s < 2**32 for s in seeds):
    raise ValueError(f"seed must be an int or {count} ints in [0, 2**32) (one per image), got {seed!r}")
  return [int(s) for s in seeds]


def draw_noise(seeds: Sequence[int], shape: tuple) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
  """((initial noise, image noise, masked-image noise), solver key): standard normal (B,) + shape.

  Row i of each comes from ``seeds[i]`` alone; the image noises are the VAE posterior draws
  of an init image and of inpainting's masked image. The solver key is the first seed's.
  """
  keys = [jax.random.split(jax.random.key(s), 4) for s in seeds]
  draw = lambda j: jnp.stack([jax.random.normal(k[j], shape) for k in keys])
  return (draw(0), draw(1), draw(2)), keys[0][3]


def given_or(draw: jax.Array, given, what: str) -> jax.Array:
  """``given`` as float32 if not None (checked against ``draw``'s shape), else ``draw``."""
  if given is None:
    return draw
  given = jnp.asarray(given, jnp.float32)
  if given.shape != draw.shape:
    raise ValueError(f"{what} has shape {given.shape}, expected {draw.shape}")
  return given


@dataclasses.dataclass
class Request:
  """The checked, task-independent part of a generation call (``request``)."""

  prompts: list[str]
  negative: list[str] | None  # None: the pipeline's default_negative
  seeds: list[int]
  shape: tuple  # (B, h, w, c) latents
  draws: tuple  # draw_noise's three noises
  solver_key: jax.Array
  tokens: tuple  # (ids, mask, negative ids, negative mask)

  def record(self, height: int, width: int, plan: Plan, guidance_scale: float, guidance: core.Guidance) -> dict:
    return {"prompts": self.prompts, "negative_prompts": self.negative, "height": height, "width": width,
            "seeds": self.seeds, "guidance_scale": float(guidance_scale), "guidance": dataclasses.asdict(guidance),
            "plan": plan.record()}


def request(pipe: core.Pipeline, prompts, negative_prompts, seed, height: int, width: int) -> Request:
  """Prompts and negatives checked (one or B negatives), seeds per image, noises drawn, prompts tokenized.

  No negative prompt means the empty one, or, for a pipeline with a ``default_negative``, None
  tokens (and ``negative`` None): the tasks then use that default (SDXL's zeros).
  """
  prompts = _as_list(prompts, "prompts")
  b = len(prompts)
  own_default = negative_prompts is None and pipe.default_negative is not None
  negative = [""] if negative_prompts is None else _as_list(negative_prompts, "negative_prompts")
  if len(negative) not in (1, b):
    raise ValueError(f"{len(negative)} negative prompts for {b} prompts: give one or {b}")
  shape = (b,) + pipe.latent_shape(height, width)
  seeds = image_seeds(seed, b)
  draws, key = draw_noise(seeds, shape[1:])
  negative_tokens = (None, None) if own_default else pipe.tokenize_checked(negative)
  return Request(prompts, None if own_default else negative, seeds, shape, draws, key,
                 pipe.tokenize_checked(prompts) + negative_tokens)


def on_mesh(mesh: jax.sharding.Mesh | None, batch: int, params, *per_call):
  """``(params, *per_call)`` placed on ``mesh``: the parameters copied to every device (a no-op for parameters
  already so placed: place them once, ``on_mesh(mesh, 1, params)[0]``) and every array whose leading axis is
  the ``batch`` of images split over all of the mesh's devices, anything else replicated. Returned unchanged
  for ``mesh=None``. Placement decides where the work runs, never the result: XLA moves rows between devices
  where a program needs them (see ``benchmarks/README.md``, sampler_throughput)."""
  if mesh is None:
    return (params, *per_call)
  if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
    raise ValueError("pipelines generate on a mesh of this process's devices (images come back to this host); "
                     "a multi-process mesh needs each process to feed its rows (benchmarks/sampler_throughput.py does)")
  if per_call and batch % mesh.size:
    raise ValueError(f"{batch} images do not split over the mesh's {mesh.size} devices: give a multiple of "
                     f"{mesh.size} prompts")
  # Auto axes (jax.make_mesh's default is Explicit): XLA propagates the batch split through the networks.
  mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * mesh.devices.ndim)
  spec = jax.sharding.PartitionSpec
  replicated = jax.sharding.NamedSharding(mesh, spec())
  split = jax.sharding.NamedSharding(mesh, spec(mesh.axis_names))
  per_image = lambda a: np.ndim(a) > 0 and np.shape(a)[0] == batch
  place = lambda a: jax.device_put(a, split if per_image(a) else replicated)
  return (jax.device_put(params, replicated), *jax.tree.map(place, per_call))


def batched(a: np.ndarray, b: int, what: str) -> np.ndarray:
  """``a`` (1 or b, ...) broadcast to (b, ...)."""
  if a.shape[0] not in (1, b):
    raise ValueError(f"{a.shape[0]} {what} for {b} prompts: give one or {b}")
  return np.broadcast_to(a, (b,) + a.shape[1:])


def finish(pipe: core.Pipeline, params, latents, record: dict, watermark: wm.Watermark,
           latent_mark: dict | None = None) -> Output:
  """Decode (when the pipeline has a decoder), map [-1, 1] to [0, 1] and write the pixel mark; the record
  gets ``watermark``: what each mark did (``latent_mark``: ``Watermark.mark_noise``'s record, if any)."""
  out = latents if pipe.decode is None else _decoder(pipe)(params, latents)
  images = np.clip(np.asarray(out, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  images, pixel_mark = watermark.mark_images(images)
  record = record | {"watermark": {"pixel": pixel_mark, "latent": latent_mark}}
  return Output(images=images, latents=np.asarray(latents), record=record)


def generate(pipe: core.Pipeline, params, prompts: str | Sequence[str], *, negative_prompts=None,
             height: int = 512, width: int = 512, plan: Plan | None = None, guidance_scale: float = 7.5,
             guidance: core.Guidance | None = None, seed: int | Sequence[int] = 0, noise=None, image=None,
             strength: float = 0.8, image_noise=None, watermark: wm.Watermark = wm.DEFAULT,
             mesh: jax.sharding.Mesh | None = None) -> Output:
  """txt2img, or img2img with ``image``, for one image per prompt.

  Args:
    prompts: B prompts; negative_prompts: B (or one) negative prompts; None: the empty prompt
      (or the pipeline's ``default_negative``: SDXL's zeros).
    height, width: output size in pixels (multiples of the VAE's downsampling).
    plan: the sampling plan (``plan_for``; default the folder's scheduler with 50 steps).
    guidance_scale: classifier-free guidance scale (1: the conditional prediction alone).
    seed: one per image, or one for all (image i then gets seed + i): image i's ``noise`` and
      ``image_noise`` are drawn from its own seed (``draw_noise``), so it does not depend on the
      batch it is in; a stochastic solver's randomness comes from the first seed.
    noise: (B, h, w, c) standard normal initial noise (the same arrays as another library's).
    image: (B, H, W, C) float in [0, 1] for img2img; strength in (0, 1] as in diffusers.
    image_noise: (B, h, w, c) standard normal for the VAE posterior sample of ``image``.
    watermark: the marks every image carries (``diffjax.watermark``; ``watermark.NONE``: none). The
      latent mark goes into txt2img's initial noise when it is drawn here (not into a given ``noise``).
    mesh: run on these devices (of this process), the images split over them (``on_mesh``; B must be a
      multiple of the device count); None: the default device.
  """
  if pipe.entry != "generate":
    raise ValueError(f"a {type(pipe).__name__}'s network takes more inputs than a prompt: use "
                     f"pipelines.{pipe.entry}")
  guidance = guidance or core.Guidance()
  plan = plan or plan_for(pipe)
  req = request(pipe, prompts, negative_prompts, seed, height, width)
  drawn = noise is None
  noise = given_or(req.draws[0], noise, "noise")
  record = req.record(height, width, plan, guidance_scale, guidance)
  key = (plan.name, plan.options, plan.denoise_final, guidance, plan.custom_solver)
  if image is None:
    noise, latent_mark = watermark.mark_noise(noise, drawn)
    params, tokens, noise = on_mesh(mesh, req.shape[0], params, req.tokens, noise)
    run = _program(pipe, "txt2img", *key)
    latents = run(params, *tokens, noise, jnp.asarray(plan.ts), jnp.float32(guidance_scale), req.solver_key,
                  init_scale=jnp.float32(plan.init_scale))
    return finish(pipe, params, latents, {"task": "txt2img"} | record, watermark, latent_mark)
  if pipe.encode_image is None:
    raise ValueError("img2img needs a pipeline with an image encoder (a VAE)")
  pixels = batched(_check_image(image, height, width, 3), req.shape[0], "init images")
  image_noise = given_or(req.draws[1], image_noise, "image_noise")
  params, tokens, pixels, image_noise, noise = on_mesh(mesh, req.shape[0], params, req.tokens, pixels, image_noise,
                                                       noise)
  image_latents = _encoder(pipe)(params, 2.0 * pixels - 1.0, image_noise)
  start = first_step(plan, strength)
  run = _program(pipe, "img2img", *key)
  latents = run(params, *tokens, image_latents, noise, jnp.asarray(plan.ts[start:]),
                jnp.float32(guidance_scale), req.solver_key)
  return finish(pipe, params, latents,
                {"task": "img2img"} | record | {"strength": float(strength), "first_step": start}, watermark)


def first_step(plan: Plan, strength: float) -> int:
  """The grid index an SDEdit run of ``strength`` starts at (diffusers' rounding over the evaluated points)."""
  n = len(plan.ts) - (0 if plan.denoise_final else 1)  # the points where the network is evaluated
  return core.strength_start(n, strength)
