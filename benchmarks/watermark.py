"""How robust and how costly diffjax's marks are: the pixel mark (dwtDct) and the latent mark under edits.

  python -m benchmarks.watermark --pretrained /tmp/diffjax_digits --count 200         # a diffjax training run
  python -m benchmarks.watermark --pretrained SD_FOLDER --size 256 --count 200        # a diffusers folder
  python -m benchmarks.watermark --pretrained /tmp/diffjax_digits --radii 1,2,3 --count 200 --attacks clean

For one pretrained pipeline: ``--count`` images made with the latent mark (seeds 0..count-1, prompts cycled),
the pixel mark written on them (where the images can carry it: RGB, >= 256 px), and ``--count`` unmarked
images from other seeds (count..2 count-1). Each set is edited by every attack (``ATTACKS``: JPEG 90/50/25,
resize 0.75/0.5 and back, centre crop 0.75/0.5 scaled back, rotation 5 and 15 degrees, Gaussian blur,
Gaussian noise, brightness), then read back: the pixel payload's bit accuracy and binomial p-value
(``watermark.pixel_p_value``), and the latent mark's exact p-value after inverting the image with
``--invert`` (the empty prompt, guidance 1). Reported per attack: TPR at p < 1e-3 and 1e-6 on the marked
set, the false-positive rate at p < 1e-3 on the unmarked set (the p-values are exact for the latent mark,
so FPR <= 1e-3 is expected; at 1e-6 a count of 200 cannot measure it), the pixel mark's mean bit accuracy;
the pixel mark's PSNR / SSIM against the same image before marking; and the time to mark and to read one
image. ``--radii`` repeats the latent mark with several key radii (the fraction of the noise it fixes grows
with the radius, and so does its strength). ``--json`` writes everything, ``--plot`` a bar chart.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, uninstalled
from benchmarks.results import output_path  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _back(pil: Image.Image, channels: int) -> np.ndarray:
  a = np.asarray(pil.convert("L" if channels == 1 else "RGB"), np.uint8)
  return a.reshape(a.shape[:2] + (channels,))


def jpeg(quality: int):
  def attack(pil):
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)  # Pillow's default chroma subsampling (4:2:0 for RGB)
    return Image.open(io.BytesIO(buffer.getvalue()))
  return attack


def resize(fraction: float):
  def attack(pil):
    w, h = pil.size
    small = pil.resize((max(1, round(w * fraction)), max(1, round(h * fraction))), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)
  return attack


def crop(fraction: float):
  def attack(pil):
    w, h = pil.size
    cw, ch = w * fraction, h * fraction
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return pil.resize((w, h), Image.BICUBIC, box=box)
  return attack


def noise(std: float, seed: int = 0):
  def attack(pil):
    a = np.asarray(pil, np.float32)
    a = a + np.random.default_rng(seed).normal(0.0, 255.0 * std, a.shape)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
  return attack


ATTACKS = {
    "clean": lambda pil: pil,
    "jpeg 90": jpeg(90), "jpeg 50": jpeg(50), "jpeg 25": jpeg(25),
    "resize 0.75": resize(0.75), "resize 0.5": resize(0.5),
    "crop 0.75": crop(0.75), "crop 0.5": crop(0.5),
    "rotate 5": lambda pil: pil.rotate(5, Image.BILINEAR), "rotate 15": lambda pil: pil.rotate(15, Image.BILINEAR),
    "blur 1px": lambda pil: pil.filter(ImageFilter.GaussianBlur(1.0)),
    "noise 0.05": noise(0.05),
    "brightness 1.5": lambda pil: ImageEnhance.Brightness(pil).enhance(1.5),
}


def attacked(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 (N, H, W, C) -> the same edited by ``ATTACKS[name]`` (size kept)."""
  return np.stack([_back(ATTACKS[name](_pil(x)), x.shape[-1]) for x in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) over pixels and channels."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  blur = lambda x: ndimage.gaussian_filter(x, (1.5, 1.5, 0), truncate=3.5)
  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  return float(np.mean((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))))


def generate_sets(pipe, params, prompts, args, key):
  """(latent-marked float images (N, H, W, C), unmarked ones, seconds per image to mark the noise)."""
  from diffjax import pipelines
  from diffjax import watermark as wm

  plan = pipelines.plan_for(pipe, args.nfe, args.sampler, args.grid)
  chosen = [prompts[i % len(prompts)] for i in range(args.count)]
  out = {}
  for name, mark, first in (("marked", wm.Watermark(pixel_bits=None, latent=key), 0),
                            ("plain", wm.NONE, args.count)):
    batches = []
    for s in range(0, args.count, args.batch):
      got = pipelines.generate(pipe, params, chosen[s:s + args.batch], height=args.size, width=args.size, plan=plan,
                               guidance_scale=args.guidance, seed=first + s, watermark=mark)
      batches.append(got.images)
    out[name] = np.concatenate(batches)
  noise = np.random.default_rng(0).standard_normal((args.batch,) + pipe.latent_shape(args.size, args.size))
  wm.latent.mark_noise(noise, key).block_until_ready()
  t = time.perf_counter()
  wm.latent.mark_noise(noise, key).block_until_ready()
  return out["marked"], out["plain"], (time.perf_counter() - t) / args.batch


def latent_p_values(pipe, params, images_u8: np.ndarray, key, args) -> tuple[np.ndarray, float]:
  """(p-values (N,), seconds per image) of the latent mark in uint8 images (inverted ``args.batch`` at a time)."""
  from diffjax import pipelines
  from diffjax import watermark as wm

  plan = pipelines.plan_for(pipe, args.invert_nfe, args.invert, args.grid)
  ps, t = [], time.perf_counter()
  for s in range(0, len(images_u8), args.batch):
    x = images_u8[s:s + args.batch].astype(np.float32) / 255.0
    inverted = pipelines.invert_images(pipe, params, x, "", height=args.size, width=args.size, plan=plan,
                                       decoder_steps=args.decoder_steps, decoder_learning_rate=args.decoder_lr)
    ps.append(wm.latent.detect(inverted.noise, key).p_values)
  return np.concatenate(ps), (time.perf_counter() - t) / len(images_u8)


def pixel_reading(images_u8: np.ndarray, bits) -> tuple[np.ndarray, np.ndarray]:
  """(bit accuracy (N,), p-values (N,)) of the pixel payload ``bits`` in RGB uint8 images."""
  from diffjax import watermark as wm

  decoded = wm.dwt_dct.decode(images_u8, len(bits))
  matches = (decoded.bits == np.asarray(bits, bool)).sum(axis=1)
  return matches / len(bits), np.array([wm.pixel_p_value(int(m), len(bits)) for m in matches])


def rates(p: np.ndarray) -> dict:
  return {"p<1e-3": float(np.mean(p < 1e-3)), "p<1e-6": float(np.mean(p < 1e-6))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pretrained", required=True,
                      help="a diffjax training workdir or a diffusers folder; 'tiny_sd': SD's architecture at toy "
                      "widths with random weights (made in /tmp/diffjax_tiny_sd on first use)")
  parser.add_argument("--prompts", default="", help="'|'-separated prompts (default: the run's config.prompts)")
  parser.add_argument("--size", type=int, default=0, help="pixels (default: the run's image size)")
  parser.add_argument("--count", type=int, default=200, help="marked images, and as many unmarked ones")
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--sampler", default="", help="default: the run's sampler.name, or dpmpp_2m")
  parser.add_argument("--grid", default="", help="default: the run's sampler.grid, or karras (inversion too)")
  parser.add_argument("--nfe", type=int, default=0, help="default: the run's sampler.nfe, or 20")
  parser.add_argument("--guidance", type=float, default=-1.0, help="default: the run's sampler.guidance_scale, or 7.5")
  parser.add_argument("--invert", default="dpmpp_2m", help="the deterministic solver that inverts the images")
  parser.add_argument("--invert_nfe", type=int, default=20)
  parser.add_argument("--decoder_steps", type=int, default=0,
                      help="refine the encoder's latents by this many decoder-inversion steps before inverting")
  parser.add_argument("--decoder_lr", type=float, default=0.1, help="the decoder inversion's Adam learning rate")
  parser.add_argument("--radii", default="0", help="latent key radii to compare (0: the default for the size)")
  parser.add_argument("--seed", type=int, default=20261206, help="the latent key's seed")
  parser.add_argument("--attacks", default=",".join(ATTACKS))
  parser.add_argument("--json", default="", type=output_path)
  parser.add_argument("--plot", default="")
  args = parser.parse_args(argv)

  from diffjax import generation
  from diffjax import watermark as wm

  if args.pretrained == "tiny_sd":
    from benchmarks.generation import make_folder

    args.pretrained = os.path.join(tempfile.gettempdir(), "diffjax_tiny_sd")
    if not os.path.isfile(os.path.join(args.pretrained, "model_index.json")):
      make_folder(args.pretrained, tiny=True)
  pipe, params, provenance = generation.load(args.pretrained)
  run_config = {}
  if provenance["kind"] == "diffjax":
    with open(os.path.join(args.pretrained, "config.json")) as f:
      run_config = json.load(f)
  prompts = args.prompts.split("|") if args.prompts else list(run_config.get("prompts") or ["a photograph"])
  args.size = args.size or run_config.get("data", {}).get("image_size", 512)
  run_sampler = run_config.get("sampler", {})
  args.guidance = run_sampler.get("guidance_scale", 7.5) if args.guidance < 0 else args.guidance
  args.sampler = args.sampler or run_sampler.get("name", "dpmpp_2m")
  args.grid = args.grid or run_sampler.get("grid", "karras")
  args.nfe = args.nfe or run_sampler.get("nfe", 20)
  attacks = args.attacks.split(",")
  bits = wm.DEFAULT.pixel_bits
  shape = pipe.latent_shape(args.size, args.size)
  print(f"{args.pretrained}: {args.count} marked + {args.count} unmarked images at {args.size} px, latent {shape}; "
        f"{args.sampler} {args.nfe} NFE on {args.grid}, guidance {args.guidance}; inversion {args.invert} "
        f"{args.invert_nfe} NFE" + (f", decoder inversion {args.decoder_steps} steps (learning rate "
                                    f"{args.decoder_lr:g})" if args.decoder_steps else ""), flush=True)
  results = {"args": vars(args), "latent_shape": list(shape), "radii": {}}
  for radius in (float(r) for r in args.radii.split(",")):
    key = wm.LatentKey(seed=args.seed, radius=radius or None, min_rank=0)  # any rank: the study is the point
    rec = key.record(shape)
    t0 = time.perf_counter()
    marked, plain, mark_noise_s = generate_sets(pipe, params, prompts, args, key)
    gen_s = (time.perf_counter() - t0) / (2 * args.count)
    marked_u8, plain_u8 = (np.round(x * 255).astype(np.uint8) for x in (marked, plain))
    pixel_ok = not wm.pixel_unsupported(marked.shape[1:])
    entry = {"key": rec, "generate_s_per_image": gen_s, "mark_noise_s_per_image": mark_noise_s, "attacks": {}}
    if pixel_ok:
      t = time.perf_counter()
      pixel_marked = wm.dwt_dct.encode(marked_u8, np.asarray(bits, np.uint8))
      entry["pixel_mark_s_per_image"] = (time.perf_counter() - t) / len(marked_u8)
      entry["pixel_psnr_db"] = float(np.mean([psnr(a, b) for a, b in zip(pixel_marked, marked_u8, strict=True)]))
      entry["pixel_ssim"] = float(np.mean([ssim(a, b) for a, b in zip(pixel_marked, marked_u8, strict=True)]))
      t = time.perf_counter()
      wm.dwt_dct.decode(pixel_marked, len(bits))
      entry["pixel_read_s_per_image"] = (time.perf_counter() - t) / len(marked_u8)
      marked_u8 = pixel_marked
    print(f"\nlatent key radius {rec['radius']:g} (rank {rec['rank']} of {int(np.prod(shape))} noise dimensions); "
          f"pixel mark: {'on' if pixel_ok else wm.pixel_unsupported(marked.shape[1:])}", flush=True)
    header = (f"{'attack':>15} | {'latent TPR@1e-3':>15} {'TPR@1e-6':>8} {'FPR@1e-3':>8} | "
              f"{'pixel bit acc':>13} {'TPR@1e-3':>8} {'TPR@1e-6':>8} {'FPR@1e-3':>8}")
    print(header + "\n" + "-" * len(header), flush=True)
    for name in attacks:
      m, u = attacked(marked_u8, name), attacked(plain_u8, name)
      p_m, read_s = latent_p_values(pipe, params, m, key, args)
      p_u, _ = latent_p_values(pipe, params, u, key, args)
      row = {"latent": {"marked": rates(p_m), "unmarked": rates(p_u), "read_s_per_image": read_s,
                        "median_p_marked": float(np.median(p_m))}}
      line = f"{name:>15} | {row['latent']['marked']['p<1e-3']:>15.3f} {row['latent']['marked']['p<1e-6']:>8.3f} " \
             f"{row['latent']['unmarked']['p<1e-3']:>8.3f} |"
      if pixel_ok:
        acc_m, pp_m = pixel_reading(m, bits)
        _, pp_u = pixel_reading(u, bits)
        row["pixel"] = {"bit_accuracy": float(acc_m.mean()), "marked": rates(pp_m), "unmarked": rates(pp_u)}
        line += f" {acc_m.mean():>13.3f} {rates(pp_m)['p<1e-3']:>8.3f} {rates(pp_m)['p<1e-6']:>8.3f} " \
                f"{rates(pp_u)['p<1e-3']:>8.3f}"
      else:
        line += f" {'-':>13} {'-':>8} {'-':>8} {'-':>8}"
      entry["attacks"][name] = row
      print(line, flush=True)
    cost = f"marking the noise {1e3 * mark_noise_s:.2f} ms/image, reading the latent mark (inversion included) " \
           f"{1e3 * entry['attacks'][attacks[-1]]['latent']['read_s_per_image']:.0f} ms/image"
    if pixel_ok:
      cost += f"; pixel mark {1e3 * entry['pixel_mark_s_per_image']:.1f} ms/image to write, " \
              f"{1e3 * entry['pixel_read_s_per_image']:.1f} to read, PSNR {entry['pixel_psnr_db']:.1f} dB, " \
              f"SSIM {entry['pixel_ssim']:.4f}"
    print(cost, flush=True)
    results["radii"][str(rec["radius"])] = entry
  if args.json:
    write_json(args.json, results, indent=2)
  if args.plot:
    plot(results, attacks, args.plot)


def plot(results: dict, attacks: list[str], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(attacks)), 3.5))
  entries = list(results["radii"].items())
  width = 0.8 / (len(entries) + 1)
  x = np.arange(len(attacks))
  for i, (radius, entry) in enumerate(entries):
    ax.bar(x + i * width, [entry["attacks"][a]["latent"]["marked"]["p<1e-3"] for a in attacks], width,
           label=f"latent mark, radius {float(radius):g}")
  pixel = [e for _, e in entries if "pixel" in next(iter(e["attacks"].values()))]
  if pixel:
    ax.bar(x + len(entries) * width, [pixel[0]["attacks"][a]["pixel"]["marked"]["p<1e-3"] for a in attacks], width,
           label="pixel mark (dwtDct)")
  ax.set_xticks(x + 0.4 - width / 2, attacks, rotation=45, ha="right")
  ax.set_ylabel("TPR at p < 1e-3")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)
  ax.set_title(os.path.basename(os.path.normpath(results["args"]["pretrained"])))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
