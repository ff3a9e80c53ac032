"""The fine-tuning job (LoRA / full, DreamBooth prior preservation) on a tiny digits base."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import finetune as finetune_config
from diffjax import generation, schema
from diffjax.adapters import lora, lora_files, textual_inversion
from diffjax.train import finetune, trainer
from diffjax.train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny digits model trained for 2 steps (no evaluation): the base every test fine-tunes."""
  workdir = str(tmp_path_factory.mktemp("base"))
  c = default.get_config("tiny")
  c.eval.digits_per_prompt, c.eval.samples_per_prompt, c.prompts, c.train.profile_steps = 0, 0, (), 0
  c.train.num_steps, c.train.checkpoint_every, c.train.log_every, c.optim.warmup_steps = 2, 2, 1, 1
  trainer.train_and_evaluate(c, workdir)
  return workdir


def _config(base, **changes):
  c = finetune_config.get_config("tiny")
  c.base = base
  c.prior.num_images = 2  # the evaluation's batch too: one sampler compilation
  for path, value in changes.items():  # "section__field": value
    *sections, key = path.split("__")
    node = c
    for part in sections:
      node = node[part]
    node[key] = value
  schema.validate(c)
  return c


def _restore(workdir, abstract):
  state, _, step = Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(abstract)
  return state, step


def test_lora_trains_the_adapters_alone_and_writes_a_file_generation_reads(base, tmp_path):
  config = _config(base)
  out = str(tmp_path / "ft")
  state = finetune.finetune(config, out)
  scores = json.load(open(os.path.join(out, "eval.json")))
  assert scores["method"] == "lora" and 0 < scores["trained_parameters"] < 0.05 * scores["base_parameters"]
  assert os.path.isfile(os.path.join(out, "finetune.png")) and os.path.isfile(os.path.join(out, finetune.PRIOR_FILE))
  # what trained: adapters on the U-Net's attention projections, and they moved (up starts at zero)
  assert all(p.startswith("denoiser/") and p.rsplit("/", 2)[-2] in ("to_q", "to_k", "to_v", "to_out_0")
             for p in state.params)
  assert any(float(jnp.abs(a.up).max()) > 0 for a in state.params.values())
  # the base workdir is untouched: its newest checkpoint is still the step it was trained to
  assert Checkpointer(os.path.join(base, "checkpoints")).all_steps()[-1] == 2
  # the LoRA file holds exactly the adapters, and the generation job merges it into the base's U-Net as training did
  pipe_params = trainer.load_pipeline(finetune.base_config(config), base)[1]
  read = lora_files.read_lora(os.path.join(out, finetune.LORA_FILE), {"unet": pipe_params["model"]["denoiser"]})
  assert sorted(read["unet"]) == sorted(p.removeprefix("denoiser/") for p in state.params)
  for path, a in state.params.items():
    b = read["unet"][path.removeprefix("denoiser/")]
    np.testing.assert_array_equal(np.asarray(b.down), np.asarray(a.down))
    np.testing.assert_array_equal(np.asarray(b.up), np.asarray(a.up))
    assert b.alpha == a.alpha
  gen = generation.with_loras({"lora": (os.path.join(out, finetune.LORA_FILE),)}, pipe_params, {"kind": "diffjax"})[0]
  tuned = lora.merge(pipe_params["model"], state.params)
  for x, y in zip(jax.tree.leaves(gen["model"]), jax.tree.leaves(tuned), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_textual_inversion_learns_the_new_rows_alone_from_a_captioned_folder(base, tmp_path):
  """A folder of images with metadata.jsonl captions using a new token: only its rows train (the base's
  table is untouched), learned_embeds.safetensors holds them, and the byte tokenizer reads the token as one id."""
  from PIL import Image

  folder = tmp_path / "sevens"
  folder.mkdir()
  rng = np.random.default_rng(0)
  with open(folder / finetune.METADATA_FILE, "w") as f:
    for i in range(4):
      Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
      f.write(json.dumps({"file_name": f"{i}.png", "text": f"a <squiggle> number {i}"}) + "\n")
  config = _config(base, method="textual_inversion", instance__folder=str(folder), prior__weight=0.0,
                   textual_inversion__token="<squiggle>", textual_inversion__initializer="seven",
                   textual_inversion__num_vectors=2, eval__prompts=1)
  out = str(tmp_path / "ti")
  state = finetune.finetune(config, out)
  assert state.params.shape == (2, 32)  # num_vectors x the tiny text encoder's width
  embedding = textual_inversion.read_embedding(os.path.join(out, finetune.EMBEDDING_FILE))
  assert embedding.token == "<squiggle>"
  np.testing.assert_array_equal(embedding.vectors[0], np.asarray(state.params))
  table = textual_inversion.token_table(trainer.load_pipeline(finetune.base_config(config), base)[1]["model"]
                                        ["text_encoder"])
  start = np.asarray(table)[[ord(ch) + 3 for ch in "seven"]].mean(0)  # the initializer's byte rows' mean
  assert not np.allclose(np.asarray(state.params), start[None])  # the rows moved from where they started
  assert json.load(open(os.path.join(out, "eval.json")))["trained_parameters"] == 64
  assert os.path.isfile(os.path.join(out, "finetune.png"))  # (the tuned model sampled a caption with the token)
  c, (params, frozen), _ = trainer.load_components(finetune.base_config(config), base)
  tokenizer = finetune.tuning(config, c, params, frozen).components.tokenizer
  assert tokenizer.encode(textual_inversion.expand_prompt(tokenizer, "a <squiggle>")) == [100, 35, 259, 35, 260]


def _controlnet_config(base):
  return _config(base, method="controlnet", prior__weight=0.0, instance__caption_contains="", eval__prompts=2)


def _moved_controlnet(base, scale=1.0):
  """(config, base components, (params, frozen), tuning, ControlNet weights moved off their zero start)."""
  config = _controlnet_config(base)
  config.controlnet.scale = scale
  c, (params, frozen), _ = trainer.load_components(finetune.base_config(config), base)
  tune = finetune.tuning(config, c, params, frozen)
  leaves, tree = jax.tree.flatten(tune.trained)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  moved = jax.tree.unflatten(tree, [w + 0.05 * jax.random.normal(k, w.shape)
                                    for w, k in zip(leaves, keys, strict=True)])
  return config, c, (params, frozen), tune, moved


def test_a_controlnet_starts_as_the_base_and_the_steered_pipeline_predicts_what_training_trained(base):
  """A ControlNet made from the base's U-Net changes nothing before training (zero convolutions): the controlled
  model's prediction equals the base's bit for bit, whatever the control image. Sampling steers the base's pipeline
  with the ControlNet (``pipelines.controlnet.with_controlnets``, as the generation job does) where training ran
  ``ControlledTextToImage``: with the ControlNet's weights moved off their zero start, both give the same
  prediction bit for bit (run eagerly, both paths are the same operations: the scale a float32 0.7 in both, the
  guidance-row factor an exact 1.0)."""
  from diffjax import pipelines
  from diffjax.models.text_to_image import controlnet_of

  _, c, (params, frozen), tune, moved = _moved_controlnet(base, scale=0.7)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  tokens, mask = (jnp.asarray(np.stack([c.tokenize(p)[i] for p in ("the digit seven", "")])) for i in (0, 1))
  control = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
  t = 0.3
  times = jnp.full((2,), t * c.pipe.time_scale)
  model = tune.components.model
  pipe = pipelines.controlnet.with_controlnets(c.pipe, [controlnet_of(model)])
  inputs = pipelines.controlnet.control_inputs(pipelines.controlnet.Control([control], scales=0.7), batch=2,
                                               height=8, width=8, ts=[t], denoise_final=True,
                                               time_scale=c.pipe.time_scale)
  pp = trainer.pipeline_params(params, frozen) | {"controlnet": moved, "control": inputs}
  controlled = lambda weights: model.apply({"params": tune.compose(weights, {"base": params})}, x, times, tokens,
                                           mask, control=jnp.asarray(control))
  with jax.disable_jit():
    plain = c.model.apply({"params": params}, x, times, tokens, mask)
    np.testing.assert_array_equal(np.asarray(controlled(tune.trained)), np.asarray(plain))
    steered = pipe.predict(pp, x, times, pipe.encode_text(pp, tokens, mask))
    np.testing.assert_array_equal(np.asarray(steered), np.asarray(controlled(moved)))
  assert float(jnp.abs(steered - plain).max()) > 1e-3  # the moved ControlNet acts


def test_sampling_with_the_controlnet_gives_each_image_its_own_control(base):
  """Through the sampler with classifier-free guidance against the one empty caption (``trainer.make_sample_fn``,
  what the job's evaluation runs): an image's sample depends on its own control image alone (changing the second
  image's control leaves the first image bit-identical and changes the second), and differs from the base's."""
  from diffjax import pipelines
  from diffjax.models.text_to_image import controlnet_of

  config, c, params, tune, moved = _moved_controlnet(base)
  plan = trainer.sample_plan(finetune.base_config(config), c.spec.process)
  steered = trainer.make_sample_fn(c._replace(pipe=pipelines.controlnet.with_controlnets(
      c.pipe, [controlnet_of(tune.components.model)])), plan)
  rng = np.random.default_rng(0)
  first, second, other = (rng.random((8, 8, 3)).astype(np.float32) for _ in range(3))
  tokens, mask = (jnp.asarray(np.stack([c.tokenize("the digit seven")[i]] * 2)) for i in (0, 1))
  ts = jnp.asarray(plan.ts, jnp.float32)

  def sample(images):
    control = pipelines.controlnet.control_inputs(pipelines.controlnet.Control([np.stack(images)]), batch=2,
                                                  height=8, width=8, ts=plan.ts, denoise_final=plan.denoise_final,
                                                  time_scale=c.pipe.time_scale)
    return np.asarray(steered(params, tokens, mask, jax.random.key(0), ts, 2.0,
                              {"controlnet": moved, "control": control}))

  a, b = sample([first, second]), sample([first, other])
  plain = np.asarray(trainer.make_sample_fn(c, plan)(params, tokens, mask, jax.random.key(0), ts, 2.0))
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(a[1] - b[1]).max() > 1e-3 and np.abs(a - plain).max() > 1e-3


@pytest.mark.slow  # about 70 s
def test_controlnet_training_writes_a_folder_that_scores_layouts_and_steers_the_generation_job(base, tmp_path):
  """After training, the ControlNet folder (diffusers ControlNetModel) loads with the trained weights, the
  evaluation reports the mask IoU of controlled and uncontrolled samples on held-out layouts, and the generation
  job steers the base workdir with the folder and a control image file (its record names both)."""
  from PIL import Image

  from configs import generate as generate_config
  from diffjax.convert.controlnet import load_controlnet

  out = str(tmp_path / "cn")
  state = finetune.finetune(_controlnet_config(base), out)
  folder = os.path.join(out, finetune.CONTROLNET_FOLDER)
  _, loaded = load_controlnet(folder)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  scores = json.load(open(os.path.join(out, "eval.json")))
  assert scores["num_layouts"] == 2 and 0.0 <= scores["tuned"]["mask_iou"] <= 1.0 and "base" in scores
  assert os.path.isfile(os.path.join(out, "control.png"))

  edges = np.zeros((8, 8, 3), np.uint8)
  edges[2:6, 2:6] = 255
  Image.fromarray(edges).save(tmp_path / "edges.png")
  job = generate_config.get_config()
  job.update(dict(pretrained=base, prompts=("the digit seven",), height=8, width=8, controlnet=(folder,),
                  control_image=(str(tmp_path / "edges.png"),)))
  job.sampler.update(dict(name="dpmpp_2m", steps=3))
  record = generation.generate(job, str(tmp_path / "generated"))
  assert record["controlnet"][0]["path"] == os.path.abspath(folder)
  assert os.path.isfile(tmp_path / "generated" / "0000.png")


@pytest.mark.slow  # three short runs (about 30 s)
def test_a_rerun_resumes_where_the_checkpoint_left_off(base, tmp_path):
  """Steps 3-4 after a resume from step 2 (the data iterators' positions included) give the uninterrupted run's
  adapters; the prior images are drawn once."""
  config = _config(base, prior__weight=0.5)
  whole = finetune.finetune(config, str(tmp_path / "whole"))
  out = str(tmp_path / "resumed")
  config.train.num_steps = 2
  finetune.finetune(config, out)
  prior_mtime = os.stat(os.path.join(out, finetune.PRIOR_FILE)).st_mtime_ns
  config.train.num_steps = 4
  resumed = finetune.finetune(config, out)
  assert os.stat(os.path.join(out, finetune.PRIOR_FILE)).st_mtime_ns == prior_mtime
  for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # about 40 s
def test_full_fine_tuning_moves_every_trained_weight(base, tmp_path):
  config = _config(base, method="full", prior__weight=0.0, train__num_steps=2)
  state = finetune.finetune(config, str(tmp_path / "full"))
  before = trainer.load_pipeline(finetune.base_config(config), base)[1]["model"]
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True)]
  assert np.mean(moved) > 0.9  # (Adam moves every weight with a gradient)
  assert not os.path.exists(str(tmp_path / "full" / finetune.LORA_FILE))


def test_merged_batch_weights_instances_and_prior():
  batch = lambda n, v: {"image": np.full((n, 2, 2, 1), v, np.float32), "tokens": np.zeros((n, 2, 3), np.int32)}
  out = finetune.merged_batch({"instance": batch(2, 1.0), "prior": batch(4, -1.0)}, prior_weight=0.5)
  np.testing.assert_allclose(np.asarray(out["weight"]), [0.5, 0.5, 0.125, 0.125, 0.125, 0.125])
  assert out["image"].shape == (6, 2, 2, 1) and out["tokens"].shape == (6, 3)
  alone = finetune.merged_batch({"instance": batch(2, 1.0)}, prior_weight=0.5)
  np.testing.assert_allclose(np.asarray(alone["weight"]), [0.5, 0.5])


@pytest.mark.parametrize("change, message", [
    (dict(base="/nonexistent"), "is not a diffjax training workdir"),
    (dict(instance__caption_contains="no such words"), "matches no caption"),
    (dict(lora__targets=("^nothing/kernel$",)), "config.lora.targets: LoRA targets match no kernel"),
    (dict(method="textual_inversion", textual_inversion__initializer=""), "initializer is empty"),
    (dict(method="textual_inversion"), "appears in no instance caption"),
])
def test_bad_input_names_the_field(base, tmp_path, change, message):
  config = _config(change.pop("base", base), **change)
  with pytest.raises(schema.ConfigError, match=message):
    finetune.finetune(config, str(tmp_path / "bad"))
