"""LoRA files: diffjax against diffusers + peft on a tiny random Stable Diffusion pipeline.

The pipeline is test_pipelines_parity's (random weights, a test-made CLIP tokenizer, nothing
downloaded). Files come from peft (``add_adapter`` + ``save_lora_weights``, with and without
the ``lora_adapter_metadata`` header), from diffjax (``write_lora``, both formats) and from this
test (a kohya file with ``.alpha`` != rank and a LoCon convolution); diffusers loads each with
``load_lora_weights`` and diffjax merges the same file (or adapters) into its parameters. An SDXL
U-Net checks kohya's original (sgm) layer names against diffusers' SDXL loader.

Tolerance: 1e-4 of the output's scale, test_pipelines_parity's images bound: the merged
networks are the same float32 computations as without a LoRA (the 40-layer U-Net rounds at
~1e-6 relative; merging adds one rounding per kernel), while a wrong alpha, a transposed factor
or a missing layer moves the outputs by the LoRA's own effect, asserted to exceed 100x the bound.
"""

from __future__ import annotations

import contextlib
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora import randomized
from test_pipelines_parity import NEGATIVE, PROMPTS, SIZE, _nhwc, _tiny_pipeline

from diffjax import pipelines
from diffjax.adapters import DEFAULT_TARGETS, Lora, LoraConfig, init_lora, lora_files, merge
from diffjax.convert import load_pretrained

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

RTOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]  # attention, LoCon 3x3 and 1x1 convs
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """(diffusers pipeline, diffjax pipeline, diffjax params, folder for files) of one tiny random SD folder."""
  tmp = tmp_path_factory.mktemp("lora")
  ref, folder = _tiny_pipeline(tmp, "ddim")
  pipe, params = pipelines.from_pretrained(folder)
  return ref, pipe, params, tmp


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  context = rng.standard_normal((2, 16, 32)).astype(np.float32)
  return x, np.asarray([10.0, 600.0], np.float32), context


def _diffusers_outputs(ref, ids, inputs):
  """(U-Net output NHWC, text-encoder last hidden state) of the diffusers pipeline as it is now."""
  x, t, context = inputs
  with torch.no_grad():
    eps = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(context)).sample
    text = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0]
  return _nhwc(eps.numpy()), text.numpy()


def _diffjax_outputs(pipe, params, ids, inputs):
  x, t, context = inputs
  return (np.asarray(pipe.predict(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))),
          np.asarray(pipe.encode_text(params, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)))))


@contextlib.contextmanager
def _loaded(ref, file):
  ref.load_lora_weights(str(file.parent), weight_name=file.name)
  try:
    yield
  finally:
    ref.unload_lora_weights()


def _assert_same(sd, inputs, file, merged):
  """diffusers with ``file`` loaded and diffjax with ``merged`` params agree; the LoRA changes both outputs."""
  ref, pipe, params, _ = sd
  ids, _ = pipe.tokenize(PROMPTS)
  base = _diffusers_outputs(ref, ids, inputs)
  with _loaded(ref, file):
    want = _diffusers_outputs(ref, ids, inputs)
  got = _diffjax_outputs(pipe, merged, ids, inputs)
  for name, g, w, b in zip(("U-Net", "text encoder"), got, want, base, strict=True):
    scale = float(np.max(np.abs(w)))
    assert float(np.max(np.abs(g - w))) <= RTOL * scale, name
    assert float(np.max(np.abs(w - b))) > 100 * RTOL * scale, f"{name}: the LoRA barely changes the output"


def _randomize(module, seed, std=0.2):
  """Random non-zero LoRA factors (peft starts lora_B at zero)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "lora_" in name:
        p.copy_(std * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def peft_files(sd):
  """{with metadata: file} saved by ``save_lora_weights`` from peft adapters (mixed ranks and alphas)."""
  ref, _, _, tmp = sd
  unet, text = copy.deepcopy(ref.unet), copy.deepcopy(ref.text_encoder)
  unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"to_k": 2},
                                   alpha_pattern={"to_v": 3}))
  text.add_adapter(peft.LoraConfig(r=2, lora_alpha=5, target_modules=TEXT_TARGETS, rank_pattern={"out_proj": 3}))
  _randomize(unet, 1)
  _randomize(text, 2)
  layers = dict(unet_lora_layers=peft.utils.get_peft_model_state_dict(unet),
                text_encoder_lora_layers=peft.utils.get_peft_model_state_dict(text))
  files = {}
  for metadata in (True, False):
    folder = tmp / f"peft_{metadata}"
    extra = dict(unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                 text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict()) if metadata else {}
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, **layers, **extra)
    files[metadata] = folder / "pytorch_lora_weights.safetensors"
  return files


@pytest.mark.parametrize("metadata", [True, False])
def test_peft_file_matches_diffusers(sd, inputs, peft_files, metadata):
  """A diffusers/peft file read by diffjax gives diffusers' U-Net and text-encoder outputs; alphas from the
  header's peft config (alpha_pattern, rank_pattern), or alpha = rank without it (as diffusers loads it)."""
  _, _, params, _ = sd
  file = peft_files[metadata]
  adapters = lora_files.read_lora(file, params)
  assert set(adapters) == {"unet", "text_encoder"}
  unet = adapters["unet"]
  assert any(k.endswith("resnets_0/conv1/kernel") and a.down.ndim == 4 for k, a in unet.items())  # LoCon read
  for path, a in unet.items():
    rank = 2 if "/to_k/" in path else 4
    assert a.rank == rank, path
    assert a.alpha == ((3 if "/to_v/" in path else 6) if metadata else rank), path
  _assert_same(sd, inputs, file, lora_files.merge_lora_files(params, file))


def test_generate_with_lora_matches_diffusers(sd, peft_files):
  """StableDiffusionPipeline with a LoRA loaded (CFG, negative prompts, DDIM 4 steps): the same images in [0, 1]."""
  ref, pipe, params, _ = sd
  file = peft_files[True]
  latents = np.random.default_rng(1).standard_normal((len(PROMPTS), 4, SIZE // 2, SIZE // 2)).astype(np.float32)
  with _loaded(ref, file), torch.no_grad():
    want = ref(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=7.5,
               latents=torch.from_numpy(latents), output_type="np").images
  run = lambda p: pipelines.generate(pipe, p, PROMPTS, negative_prompts=NEGATIVE, height=SIZE, width=SIZE,
                                     plan=pipelines.plan_for(pipe, 4), guidance_scale=7.5, noise=_nhwc(latents)).images
  got = run(lora_files.merge_lora_files(params, file))
  assert float(np.max(np.abs(got - want))) <= 1e-4
  assert float(np.max(np.abs(run(params) - want))) > 1e-2  # the LoRA changes the images


def _diffjax_adapters(params, per_layer_alphas: bool):
  """Random adapters of mixed ranks and alphas: U-Net attention (r 4, alpha 2), ResNet conv1 LoCon (r 2, alpha 5),
  feed-forward (r 3, alpha 3), text-encoder q, k, v (r 3, alpha 1.5) and out_proj (r 2). ``per_layer_alphas``:
  also attn2's to_k (r 2, alpha 1) and out_proj alpha 4, alphas diffusers reads from peft metadata but not from a
  kohya file (test_kohya_file_matches_diffusers)."""
  def make(tree, configs, seed):
    fresh = {}
    for i, config in enumerate(configs):  # later configs replace earlier ones' layers: mixed ranks
      fresh |= init_lora(tree, config, jax.random.key(seed + i))
    return randomized(fresh, seed + 100)

  unet = [LoraConfig(rank=4, alpha=2.0), LoraConfig(rank=2, alpha=5.0, targets=(r"resnets_\d+/conv1/",)),
          LoraConfig(rank=3, targets=(r"ff/net_",))]
  text = [LoraConfig(rank=3, alpha=1.5, targets=(r"(q|k|v|out)_proj/",)),
          LoraConfig(rank=2, alpha=4.0 if per_layer_alphas else 1.5, targets=(r"out_proj/",))]
  if per_layer_alphas:
    unet.append(LoraConfig(rank=2, alpha=1.0, targets=(r"attn2/to_k/",)))
  return {"unet": make(params["unet"], unet, 0), "text_encoder": make(params["text_encoder"], text, 10)}


@pytest.mark.parametrize("format", lora_files.FORMATS)
def test_diffjax_file_loads_in_diffusers(sd, inputs, format):
  """diffjax writes random mixed-rank adapters; diffusers' load_lora_weights gives diffjax's merged outputs."""
  _, _, params, tmp = sd
  adapters = _diffjax_adapters(params, per_layer_alphas=format == "diffusers")
  file = tmp / f"diffjax_{format}" / "lora.safetensors"
  file.parent.mkdir()
  lora_files.write_lora(file, adapters, format=format)
  merged = {**params, **{m: merge(params[m], a) for m, a in adapters.items()}}
  _assert_same(sd, inputs, file, merged)


def test_kohya_file_matches_diffusers(sd, inputs):
  """A kohya file written here in PyTorch layout: mixed ranks, alpha != rank, a 3x3 LoCon layer, a text-encoder MLP.

  One alpha per model: diffusers 0.42.1 files a kohya ``.alpha`` of a U-Net attention layer under its
  ``processor.to_q_lora`` name and a text encoder's under ``text_model.`` (gone in transformers 5), so
  those layers get the model's most common alpha instead (diffjax reads each layer's, test_lora.py).
  """
  ref, _, params, tmp = sd
  gen = torch.Generator().manual_seed(5)
  shapes = {n: tuple(p.shape) for n, p in ref.unet.named_parameters()}
  shapes |= {n: tuple(p.shape) for n, p in ref.text_encoder.named_parameters()}
  layers = {  # kohya name: (module's weight, rank, alpha)
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", 4, 1.5),
      "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": (
          "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight", 2, 1.5),
      "lora_unet_mid_block_resnets_1_conv1": ("mid_block.resnets.1.conv1.weight", 3, 1.5),
      "lora_te_text_model_encoder_layers_1_mlp_fc1": ("encoder.layers.1.mlp.fc1.weight", 2, 0.5),
      "lora_te_text_model_encoder_layers_0_self_attn_out_proj": ("encoder.layers.0.self_attn.out_proj.weight", 4, 0.5),
  }
  state = {}
  for name, (weight, rank, alpha) in layers.items():
    out, inp, *kernel = shapes[weight]
    state[f"{name}.lora_down.weight"] = 0.3 * torch.randn((rank, inp, *kernel), generator=gen)
    state[f"{name}.lora_up.weight"] = 0.3 * torch.randn((out, rank, *[1 for _ in kernel]), generator=gen)
    state[f"{name}.alpha"] = torch.tensor(alpha)
  file = tmp / "kohya" / "lora.safetensors"
  file.parent.mkdir()
  safetensors_torch.save_file(state, str(file))
  adapters = lora_files.read_lora(file, params)
  conv = adapters["unet"]["mid_block/resnets_1/conv1/kernel"]
  assert isinstance(conv, Lora) and conv.down.shape == (3, 3, 32, 3) and conv.alpha == 1.5
  _assert_same(sd, inputs, file, lora_files.merge_lora_files(params, file))


def test_sdxl_kohya_original_names_match_diffusers(tmp_path):
  """An SDXL U-Net's adapters written under kohya's original (sgm) names (``input_blocks_4_1_...``, ``in_layers_2``,
  ``op``, ``label_emb_0_0`` ...): diffusers' SDXL loader maps them back onto the same layers (same outputs), and
  diffjax reads them back. Two ResNets per level, so block indices differ from level indices."""
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
      transformer_layers_per_block=(1, 2), norm_num_groups=8, addition_embed_type="text_time",
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()
  ref.save_pretrained(tmp_path / "unet")
  module, params = load_pretrained(tmp_path / "unet")
  targets = (*DEFAULT_TARGETS, r"resnets_\d+/conv1/", r"time_emb_proj/", r"(down|up)samplers_0/conv/",
             r"add_embedding/linear_1/", r"proj_in/", r"ff/net_2/")
  fresh = init_lora(params, LoraConfig(rank=3, alpha=2.0, targets=targets), jax.random.key(0))
  adapters = randomized(fresh, 1)
  file = tmp_path / "lora" / "sdxl_kohya.safetensors"
  file.parent.mkdir()
  lora_files.write_lora(file, {"unet": adapters}, format="kohya", kohya_unet_params=params)
  names = safetensors_torch.load_file(str(file))
  assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.alpha" in names  # level 1, ResNet 0
  assert {"lora_unet_input_blocks_3_0_op.alpha", "lora_unet_label_emb_0_0.alpha"} <= set(names)
  assert set(lora_files.read_lora(file, {"unet": params})["unet"]) == set(adapters)

  rng = np.random.default_rng(0)
  x, context = rng.standard_normal((2, 8, 8, 4)), rng.standard_normal((2, 16, 24))
  pooled, time_ids = rng.standard_normal((2, 16)), np.asarray([[16, 16, 0, 0, 16, 16]] * 2)
  t = np.asarray([10.0, 600.0])
  tensors = [torch.from_numpy(np.asarray(a, np.float32)) for a in (x.transpose(0, 3, 1, 2), t, context, pooled,
                                                                    time_ids)]

  def diffusers_out():
    with torch.no_grad():
      return _nhwc(ref(*tensors[:2], encoder_hidden_states=tensors[2],
                       added_cond_kwargs={"text_embeds": tensors[3], "time_ids": tensors[4]}).sample.numpy())

  base = diffusers_out()
  state, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(file), unet_config=ref.config)
  diffusers.StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, ref)
  want = diffusers_out()
  got = np.asarray(module.apply({"params": merge(params, adapters)}, *(jnp.asarray(a, jnp.float32) for a in (
      x, t, context)), text_embeds=jnp.asarray(pooled, jnp.float32), time_ids=jnp.asarray(time_ids, jnp.float32)))
  scale = float(np.max(np.abs(want)))
  assert float(np.max(np.abs(got - want))) <= RTOL * scale
  assert float(np.max(np.abs(want - base))) > 100 * RTOL * scale
