"""Two-stage latent diffusion on shapes: the tiny VAE run, the tiny LDM run on its export, the latent cache,
frozen parts, and configuration errors. One tiny VAE run (module fixture) serves every test."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import shapes_ldm, shapes_mmdit, shapes_vae
from diffjax.convert import load_pretrained, save_pretrained
from diffjax.data import pipeline, shapes
from diffjax.evaluate import features, metrics
from diffjax.models import vae as vae_lib
from diffjax.models.text import BertConfig, BertEncoder
from diffjax.pipelines import vae as vae_codec
from diffjax.train import latent, steps, trainer, vae_trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("vae"))
  config = shapes_vae.get_config("tiny")
  config.data.data_dir = data_dir
  vae_trainer.train_vae(config, workdir)
  return config, workdir


def _ldm_config(vae_workdir, data_dir, backbone=shapes_ldm, **text):
  config = backbone.get_config("tiny")
  config.vae.workdir, config.data.data_dir = vae_workdir, data_dir
  config.text.update(text)
  return config


def _held_out_images(data_dir, n=32, split="held_out"):
  source = pipeline.load_source("shapes_captions", split, data_dir)
  return np.stack([source[i]["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1.0


def test_vae_trains_checkpoints_and_exports_scaling_factor(vae_run, data_dir):
  config, workdir = vae_run
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  scores = json.loads(open(os.path.join(workdir, "eval.json")).read())
  assert scores["latent_shape"] == [8, 8, 4] and scores["num_images"] == config.eval.num_images
  np.testing.assert_allclose(scores["scaling_factor"], 1.0 / scores["latent_std"], rtol=1e-6)
  per_attribute = [scores[f"recon_{a}_accuracy"] for a in ("colour", "shape", "count", "position")]
  assert 0.0 <= scores["recon_attribute_accuracy"] <= min(per_attribute) <= 1.0  # all right <= each right
  vae, params = load_pretrained(os.path.join(workdir, "vae"))
  assert vae.config.scaling_factor == pytest.approx(scores["scaling_factor"])
  grid = np.asarray(Image.open(os.path.join(workdir, "reconstructions.png")))
  assert grid.shape[1] > grid.shape[0]  # two rows: originals above reconstructions
  # training lowered the reconstruction error of images it never saw well below that of the initial weights
  x = _held_out_images(data_dir, split=config.data.eval_split)
  initial = jax.jit(vae_trainer.build_components(config).init_state)().params["vae"]
  reconstruct = jax.jit(lambda p: jnp.clip(vae.apply({"params": p}, x)[0], -1.0, 1.0))
  error = lambda p: float(jnp.mean(vae_lib.reconstruction_loss(x, reconstruct(p))))
  assert error(params) < 0.7 * error(initial)
  assert scores["l1"] == pytest.approx(error(params), rel=1e-4)  # eval.json measured the same 32 images


@pytest.mark.slow  # minutes of compilation on 2 CPU cores: python -m pytest -m slow tests/test_latent.py
def test_vae_discriminator_starts_at_disc_start_and_trains(data_dir):
  config = shapes_vae.get_config("tiny")
  config.vae.disc_weight, config.vae.disc_start = 0.5, 2
  c = vae_trainer.build_components(config)
  step = jax.jit(lambda s, b: vae_trainer.vae_train_step(s, b, vae=c.vae, disc=c.disc, tx=c.tx, loss=c.loss))
  state = jax.jit(c.init_state)()
  batch = {"image": jnp.asarray(_held_out_images(data_dir, 4))}
  snapshots = [jax.tree.map(np.asarray, state.params)]
  for _ in range(3):  # learning rate 0 at step 0 (warmup), discriminator off before step 2
    state, metrics, loss = step(state, batch)
    snapshots.append(jax.tree.map(np.asarray, state.params))
  assert np.isfinite(float(loss)) and float(metrics.compute()["disc_loss"]) > 0
  same = lambda a, b, part: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[part]),
                                                                     jax.tree.leaves(b[part]), strict=True))
  assert same(snapshots[1], snapshots[2], "disc") and not same(snapshots[1], snapshots[2], "vae")
  assert not same(snapshots[2], snapshots[3], "disc")


@pytest.mark.slow  # minutes of compilation on 2 CPU cores: python -m pytest -m slow tests/test_latent.py
@pytest.mark.parametrize("backbone", [shapes_ldm, shapes_mmdit], ids=["unet", "mmdit"])
def test_ldm_trains_samples_and_evaluates_held_out_captions(vae_run, data_dir, tmp_path, backbone):
  config = _ldm_config(vae_run[1], data_dir, backbone)
  config.data.cache_latents = True
  workdir = str(tmp_path / "ldm")
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == config.train.num_steps and set(state.params) == {"denoiser", "text_encoder"}
  assert os.path.exists(latent.cache_path(workdir, config.data.train_split))
  scores = json.loads(open(os.path.join(workdir, "eval.json")).read())
  for split in ("held_out", "validation"):
    assert set(scores[split]) >= {"colour", "shape", "count", "position", "all"}
    assert scores[split]["num_samples"] == 5 and len(scores[split]["prompts"]) == 5
    assert os.path.exists(os.path.join(workdir, f"shapes_{split}.png"))
    # the sample metrics in the shapes feature space: reported if they passed the suite, else named
    assert sorted([*scores[split]["metrics"], *scores[split]["not_reported"]]) == sorted(metrics.BETTER)
    assert scores[split]["features"]["name"] == features.SHAPES_VERSION
  held = {tuple(c) for c in shapes.HELD_OUT}
  for prompt in scores["held_out"]["prompts"]:
    assert any(f"{colour} {shape}" in prompt for colour, shape in held)
  # --mode=sample: decoded 32x32 RGB images
  imgs = trainer.sample_from_checkpoint(config, workdir, ["a blue triangle on the left"], 2, str(tmp_path / "out"))
  assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8
  assert os.path.exists(tmp_path / "out" / "grid.png")


def test_mmdit_backbone_reads_the_caption_trains_and_samples(vae_run, data_dir):
  """configs/shapes_mmdit.py: the denoiser is an MMDiT whose prediction depends on the caption through both the
  token states (joint attention) and the pooled vector (adaLN); it trains by rectified flow and samples."""
  config = _ldm_config(vae_run[1], data_dir, shapes_mmdit)
  c = trainer.build_components(config)
  assert c.model.is_transformer and c.spec.target == "velocity"
  state = jax.jit(c.init_state)()
  assert set(state.params) == {"denoiser", "text_encoder"} and "transformer_blocks_1" in state.params["denoiser"]
  tokens = jnp.stack([jnp.asarray(c.tokenize(p)) for p in ("a red circle on the left", "two blue squares")])
  ids, mask = tokens[:, 0], tokens[:, 1]
  x = jax.random.normal(jax.random.key(0), (2,) + c.image_shape)
  t = jnp.full((2,), 500.0)
  apply = lambda method, *a: c.model.apply({"params": state.params}, *a, method=method)
  states, pooled = apply(c.model.encode_text, ids, mask)
  assert states.shape == (2, config.data.max_caption_length, 32) and pooled.shape == (2, 32)
  out = apply(c.model.predict, x, t, (states, pooled))
  assert out.shape == x.shape and np.isfinite(out).all()
  # each path moves the prediction far beyond float32 rounding (~1e-6 of |out| ~ 1); the change was not recorded
  for other in ((states[::-1], pooled), (states, pooled[::-1])):
    assert float(jnp.max(jnp.abs(apply(c.model.predict, x, t, other) - out))) > 1e-3
  step = jax.jit(lambda s, b: steps.train_step(s, b, c.null_tokens, c.null_mask, model=c.model, tx=c.tx, spec=c.spec,
                                               frozen=c.frozen, encode=c.latent.encode)[0])
  images = jnp.asarray(_held_out_images(data_dir, 2, "train"))
  batch = {"image": images, "tokens": ids, "mask": mask}
  new = step(step(state, batch), batch)  # the learning rate warms up from 0 at step 0
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert any(jax.tree.leaves(moved["text_encoder"])) and any(jax.tree.leaves(moved["denoiser"]))
  plan = trainer.sample_plan(config, c.spec.process)
  sample = trainer.make_sample_fn(c, plan)
  imgs = sample((new.params, c.frozen), ids, mask, jax.random.key(1), jnp.asarray(plan.ts, jnp.float32), 3.0)
  assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all()


def test_representation_alignment_trains_the_blocks_it_reads_and_never_samples(vae_run, data_dir):
  """REPA (train/repa.py) adds weight x alignment of the tokens after block `layer`: the gradient of every parameter
  after that block (the last block, the output layers) is the plain denoising gradient, the blocks up to it and
  the projector get the alignment's too; the projector stays out of the sampling parameters."""
  config = _ldm_config(vae_run[1], data_dir, shapes_mmdit)
  config.repa.update(dict(weight=0.5, layer=1, projector_width=16))
  c = trainer.build_components(config)
  assert c.repa is not None and c.model.backbone.num_layers == 2
  state = jax.jit(c.init_state)()
  assert set(state.params) == {"denoiser", "text_encoder", "repa_projector"}
  tokens = jnp.stack([jnp.asarray(c.tokenize(p)) for p in ("a red circle on the left", "two blue squares")])
  batch = {"image": jnp.asarray(_held_out_images(data_dir, 2, "train")), "tokens": tokens[:, 0],
           "mask": tokens[:, 1]}
  sgd = optax.sgd(1.0)  # new params = params - gradient: the step's gradient, read back exactly
  state = state.replace(opt_state=sgd.init(state.params))

  def gradient(repa):
    new, metrics, _ = steps.train_step(state, batch, c.null_tokens, c.null_mask, model=c.model, tx=sgd, spec=c.spec,
                                       frozen=c.frozen, encode=c.latent.encode, repa=repa)
    return jax.tree.map(lambda a, b: a - b, state.params, new.params), metrics.compute()

  with_repa, scores = jax.jit(lambda: gradient(c.repa))()
  plain, plain_scores = jax.jit(lambda: gradient(None))()
  assert -1.0 <= scores["repa_alignment"] <= 1.0 and "repa_alignment" not in plain_scores
  # the same forward pass: the reported denoising loss is the same (float32 rounding of another compilation)
  np.testing.assert_allclose(scores["loss"], plain_scores["loss"], rtol=1e-5)
  denoiser, plain_denoiser = with_repa["denoiser"], plain["denoiser"]
  after = ["transformer_blocks_1", "norm_out", "proj_out"]
  for name in after:
    for a, b in zip(jax.tree.leaves(denoiser[name]), jax.tree.leaves(plain_denoiser[name]), strict=True):
      # two compilations of one gradient: rounding of a few hundred float32 operations, ~1e-5 of the largest entry
      np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12)
  differs = lambda a, b: float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
  first = [differs(a, b) for a, b in zip(jax.tree.leaves(denoiser["transformer_blocks_0"]),
                                         jax.tree.leaves(plain_denoiser["transformer_blocks_0"]), strict=True)]
  assert max(first) > 1e-2  # the alignment's gradient, three orders above that rounding
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(with_repa["repa_projector"]))
  # sampling: the pipeline's parameters hold no projector, and the sampler runs on the REPA-trained state
  assert "repa_projector" not in trainer.pipeline_params(state.params, c.frozen)["model"]
  plan = trainer.sample_plan(config, c.spec.process)
  imgs = trainer.make_sample_fn(c, plan)((state.params, c.frozen), batch["tokens"], batch["mask"],
                                         jax.random.key(1), jnp.asarray(plan.ts, jnp.float32), 3.0)
  assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all()


def test_cached_latents_are_the_vae_posteriors_and_resume_exactly(vae_run, data_dir, tmp_path):
  config = _ldm_config(vae_run[1], data_dir)
  pixel_parts = latent.build(config)
  config.data.cache_latents = True
  parts = latent.build(config)
  source = pipeline.load_source("shapes_captions", "train[:64]", data_dir)
  path = str(tmp_path / "cache.npz")
  tokenize = trainer.tokenize_fn(config.data.max_caption_length)
  ds = latent.cached_dataset(parts, source, path, 8, tokenize, seed=1)
  it = iter(ds)
  batch = next(it)
  images = np.stack([source[int(i)]["image"] for i in batch["index"]]).astype(np.float32) / 127.5 - 1.0
  mean, std = jax.jit(lambda x: vae_codec.posterior(parts.vae, parts.frozen["vae"], x))(images)
  # cached moments come from the same jitted posterior on the same images (measured: equal); 1e-5 covers a
  # recompilation's rounding (~lambda sqrt(k) u per conv layer, as in test_models_vae's parity test)
  np.testing.assert_allclose(batch["latent_mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batch["latent_std"], std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch["tokens"], [tokenize(source[int(i)]["caption"].decode()) for i in batch["index"]])
  # the step's latents from cached moments equal those from encoding the pixels in the step (same key)
  key = jax.random.key(3)
  from_pixels = pixel_parts.encode(pixel_parts.frozen, {"image": images}, key)
  # two compilations of the VAE encoder (cached + sample vs in-step): per conv layer ~3 sqrt(9 C) u relative
  # to the activations, a random walk over the encoder's layers: ~1e-6 x |z|; measured 8.3e-7 (0.06 x tol)
  np.testing.assert_allclose(parts.encode(parts.frozen, batch, key), from_pixels, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(from_pixels)) > 0.1
  # exact resumption from a saved iterator state
  next(it)
  saved = it.get_state()
  expected = next(it)
  resumed = iter(latent.cached_dataset(parts, source, path, 8, tokenize, seed=1))  # reuses the file
  resumed.set_state(saved)
  got = next(resumed)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])


def _tiny_bert_folder(folder):
  words = sorted({w for c in shapes.COLOURS for s in shapes.SHAPES for n in (1, 2, 3) for p in shapes.POSITIONS
                  for w in shapes.caption(c, s, n, p).split()})
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
  module = BertEncoder(BertConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_layers=1,
                                  num_heads=2, max_positions=64))
  params = nn.meta.unbox(module.init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"])
  save_pretrained(module, params, folder)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")


@pytest.mark.slow  # minutes of compilation on 2 CPU cores: python -m pytest -m slow tests/test_latent.py
def test_frozen_text_encoder_and_vae_stay_frozen(vae_run, data_dir, tmp_path):
  folder = str(tmp_path / "bert")
  _tiny_bert_folder(folder)
  config = _ldm_config(vae_run[1], "", mode="frozen_pretrained", path=folder)
  c = trainer.build_components(config)
  state = jax.jit(c.init_state)()
  assert set(state.params) == {"denoiser"}  # the frozen encoder is not trained (nor checkpointed)
  tokens = np.stack([c.tokenize(shapes.caption("red", "circle", n, "left")) for n in (1, 2, 3, 1)])
  assert tokens[0, 0, 0] == 2 and tokens[0, 0, 1] > 4  # [CLS] and a real word piece, not [UNK]
  batch = {"image": jnp.asarray(_held_out_images(data_dir, 4)),
           "tokens": jnp.asarray(tokens[:, 0]), "mask": jnp.asarray(tokens[:, 1])}
  step = jax.jit(lambda s, b, f: steps.train_step(s, b, c.null_tokens, c.null_mask, model=c.model, tx=c.tx,
                                                  spec=c.spec, frozen=f, encode=c.latent.encode))
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(2):
    state, _, diag = step(state, batch, c.frozen)
  assert np.isfinite(float(diag["loss"]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.tree.map(np.asarray, state.params))
  assert any(jax.tree.leaves(changed))
  _, text_params = load_pretrained(folder)
  _, vae_params = load_pretrained(os.path.join(vae_run[1], "vae"))
  jax.tree.map(np.testing.assert_array_equal, c.frozen["model"]["text_encoder"], text_params)
  jax.tree.map(np.testing.assert_array_equal, c.frozen["vae"], vae_params)
  # the U-Net reads the frozen encoder: its cross-attention width is BERT's
  assert c.model.backbone.cross_attention_dim == 24


def test_missing_vae_workdir_and_bad_settings_are_clear_errors(tmp_path):
  config = _ldm_config(str(tmp_path / "nothing"), "")
  with pytest.raises(FileNotFoundError, match="configs/shapes_vae.py"):
    trainer.validate(config)
  config.text.mode = "frozen"
  with pytest.raises(ValueError, match="text.mode"):
    trainer.validate(config)
  config = _ldm_config(str(tmp_path), "", mode="frozen_pretrained", path=str(tmp_path / "no_model"))
  with pytest.raises(FileNotFoundError, match="text.path"):
    trainer.validate(config)
