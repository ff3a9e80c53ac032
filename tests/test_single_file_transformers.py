"""Original single-file transformer checkpoints (SD3 / SD3.5, FLUX.1, DiT) -> diffjax, against diffusers.

The oracle for SD3 and FLUX.1 is diffusers' own single-file conversion: each test writes a tiny random model in
the original layout and first checks that diffusers' converter turns it back into exactly the diffusers model's
state dict (so the file is what diffusers reads), then compares diffjax's ``load_pretrained`` of the file with
that model's output, and its parameters with those ``load_pretrained`` makes of the model's diffusers folder.
DiT has no installed converter: the key map of diffusers' ``scripts/convert_dit_to_diffusers.py`` is written
out below as the test's facts.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest
import tolerances
from reference_models import flux_outputs, jiggle

from diffjax.convert import WeightFileError, WeightMismatchError, load_pretrained, write_safetensors
from diffjax.convert.files import read_weights
from diffjax.convert.pretrained import models_from_ldm, transformer_from_original
from diffjax.models.dit import DiT
from diffjax.models.flux import Flux, image_ids
from diffjax.models.mmdit import MMDiT

pytestmark = pytest.mark.reference
torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
single_file_utils = pytest.importorskip('diffusers.loaders.single_file_utils')

PREFIX = 'model.diffusion_model.'
# SD3 without QK norms has 64-channel heads (the only size its file implies); SD3.5 with them, any size.
SD3 = {
    'sd3': dict(attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128),
    'sd3.5': dict(attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, qk_norm='rms_norm',
                  dual_attention_layers=(0,)),
}
SD3_COMMON = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, joint_attention_dim=16,
                  pooled_projection_dim=12, pos_embed_max_size=16)
# 32-channel heads: FLUX.1's rotary axes (16, 56, 56) of 128 channels scaled to them are (4, 14, 14).
FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 14, 14))
DIT = dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
           patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)


def bound(blocks: int, longest_sum: int) -> float:
  """The parity tests' estimate of float32 rounding (tests/test_models_dit.py): 2 L 3 sqrt(k) u of the largest
  output for L blocks and the longest sum k, with a factor 3 of margin."""
  return 2 * blocks * 3 * math.sqrt(longest_sum) * tolerances.U32 * 3


# -- the original layouts, as inverses of diffusers' conversions -------------------------------------------------
def put(out: dict, sd: dict, original: str, *names: str, swap: bool = False):
  """``out[original.leaf]`` = the rows of diffusers' modules ``names`` stacked (a fused tensor), for each leaf
  the first has; ``swap``: its two halves exchanged ((scale, shift) -> the original's (shift, scale))."""
  for leaf in ('weight', 'bias'):
    if f'{names[0]}.{leaf}' in sd:
      w = torch.cat([sd[f'{n}.{leaf}'] for n in names])
      out[f'{original}.{leaf}'] = torch.cat(w.chunk(2)[::-1]) if swap else w


def sd3_original(sd: dict, num_layers: int) -> dict:
  """Stability's SD3 / SD3.5 file (``model.diffusion_model.*``) of a diffusers ``SD3Transformer2DModel``'s state."""
  out = {'pos_embed': sd['pos_embed.pos_embed']}
  for original, name in (('x_embedder.proj', 'pos_embed.proj'),
                         ('t_embedder.mlp.0', 'time_text_embed.timestep_embedder.linear_1'),
                         ('t_embedder.mlp.2', 'time_text_embed.timestep_embedder.linear_2'),
                         ('y_embedder.mlp.0', 'time_text_embed.text_embedder.linear_1'),
                         ('y_embedder.mlp.2', 'time_text_embed.text_embedder.linear_2'),
                         ('context_embedder', 'context_embedder'), ('final_layer.linear', 'proj_out')):
    put(out, sd, original, name)
  put(out, sd, 'final_layer.adaLN_modulation.1', 'norm_out.linear', swap=True)
  for i in range(num_layers):
    b, j = f'transformer_blocks.{i}.', f'joint_blocks.{i}.'
    put(out, sd, j + 'x_block.attn.qkv', *(f'{b}attn.to_{p}' for p in 'qkv'))
    put(out, sd, j + 'x_block.attn2.qkv', *(f'{b}attn2.to_{p}' for p in 'qkv'))
    put(out, sd, j + 'context_block.attn.qkv', *(f'{b}attn.add_{p}_proj' for p in 'qkv'))
    put(out, sd, j + 'context_block.adaLN_modulation.1', b + 'norm1_context.linear', swap=i == num_layers - 1)
    for original, name in (('x_block.adaLN_modulation.1', 'norm1.linear'), ('x_block.attn.proj', 'attn.to_out.0'),
                           ('x_block.attn2.proj', 'attn2.to_out.0'), ('x_block.mlp.fc1', 'ff.net.0.proj'),
                           ('x_block.mlp.fc2', 'ff.net.2'), ('context_block.attn.proj', 'attn.to_add_out'),
                           ('context_block.mlp.fc1', 'ff_context.net.0.proj'),
                           ('context_block.mlp.fc2', 'ff_context.net.2'),
                           ('x_block.attn.ln_q', 'attn.norm_q'), ('x_block.attn.ln_k', 'attn.norm_k'),
                           ('x_block.attn2.ln_q', 'attn2.norm_q'), ('x_block.attn2.ln_k', 'attn2.norm_k'),
                           ('context_block.attn.ln_q', 'attn.norm_added_q'),
                           ('context_block.attn.ln_k', 'attn.norm_added_k')):
      put(out, sd, j + original, b + name)
  return {PREFIX + k: v for k, v in out.items()}


def flux_original(sd: dict, num_layers: int, num_single_layers: int) -> dict:
  """Black Forest Labs' FLUX.1 file (bare keys) of a diffusers ``FluxTransformer2DModel``'s state."""
  out = {}
  for original, name in (('img_in', 'x_embedder'), ('txt_in', 'context_embedder'),
                         ('time_in.in_layer', 'time_text_embed.timestep_embedder.linear_1'),
                         ('time_in.out_layer', 'time_text_embed.timestep_embedder.linear_2'),
                         ('vector_in.in_layer', 'time_text_embed.text_embedder.linear_1'),
                         ('vector_in.out_layer', 'time_text_embed.text_embedder.linear_2'),
                         ('guidance_in.in_layer', 'time_text_embed.guidance_embedder.linear_1'),
                         ('guidance_in.out_layer', 'time_text_embed.guidance_embedder.linear_2'),
                         ('final_layer.linear', 'proj_out')):
    put(out, sd, original, name)
  put(out, sd, 'final_layer.adaLN_modulation.1', 'norm_out.linear', swap=True)
  for i in range(num_layers):
    b, d = f'transformer_blocks.{i}.', f'double_blocks.{i}.'
    put(out, sd, d + 'img_attn.qkv', *(f'{b}attn.to_{p}' for p in 'qkv'))
    put(out, sd, d + 'txt_attn.qkv', *(f'{b}attn.add_{p}_proj' for p in 'qkv'))
    for original, name in (('img_mod.lin', 'norm1.linear'), ('txt_mod.lin', 'norm1_context.linear'),
                           ('img_attn.proj', 'attn.to_out.0'), ('txt_attn.proj', 'attn.to_add_out'),
                           ('img_mlp.0', 'ff.net.0.proj'), ('img_mlp.2', 'ff.net.2'),
                           ('txt_mlp.0', 'ff_context.net.0.proj'), ('txt_mlp.2', 'ff_context.net.2')):
      put(out, sd, d + original, b + name)
    for original, name in (('img_attn.norm.query_norm', 'attn.norm_q'), ('img_attn.norm.key_norm', 'attn.norm_k'),
                           ('txt_attn.norm.query_norm', 'attn.norm_added_q'),
                           ('txt_attn.norm.key_norm', 'attn.norm_added_k')):
      out[f'{d}{original}.scale'] = sd[f'{b}{name}.weight']
  for i in range(num_single_layers):
    b, s = f'single_transformer_blocks.{i}.', f'single_blocks.{i}.'
    put(out, sd, s + 'linear1', b + 'attn.to_q', b + 'attn.to_k', b + 'attn.to_v', b + 'proj_mlp')
    put(out, sd, s + 'linear2', b + 'proj_out')
    put(out, sd, s + 'modulation.lin', b + 'norm.linear')
    out[f'{s}norm.query_norm.scale'] = sd[f'{b}attn.norm_q.weight']
    out[f'{s}norm.key_norm.scale'] = sd[f'{b}attn.norm_k.weight']
  return out


def dit_script(original: dict, num_layers: int) -> dict:
  """The key map of diffusers' ``scripts/convert_dit_to_diffusers.py`` (DiT file -> ``DiTTransformer2DModel``):
  the timestep and class embedders are copied into every block, ``qkv`` split, ``pos_embed`` left out."""
  o = original
  sd = {}
  for leaf in ('weight', 'bias'):
    sd[f'pos_embed.proj.{leaf}'] = o[f'x_embedder.proj.{leaf}']
    sd[f'proj_out_1.{leaf}'] = o[f'final_layer.adaLN_modulation.1.{leaf}']
    sd[f'proj_out_2.{leaf}'] = o[f'final_layer.linear.{leaf}']
    for i in range(num_layers):
      b, x = f'transformer_blocks.{i}.', f'blocks.{i}.'
      sd[f'{b}norm1.emb.timestep_embedder.linear_1.{leaf}'] = o[f't_embedder.mlp.0.{leaf}']
      sd[f'{b}norm1.emb.timestep_embedder.linear_2.{leaf}'] = o[f't_embedder.mlp.2.{leaf}']
      sd[f'{b}norm1.linear.{leaf}'] = o[f'{x}adaLN_modulation.1.{leaf}']
      q, k, v = torch.chunk(o[f'{x}attn.qkv.{leaf}'], 3, dim=0)
      sd.update({f'{b}attn1.to_q.{leaf}': q, f'{b}attn1.to_k.{leaf}': k, f'{b}attn1.to_v.{leaf}': v})
      sd[f'{b}attn1.to_out.0.{leaf}'] = o[f'{x}attn.proj.{leaf}']
      sd[f'{b}ff.net.0.proj.{leaf}'] = o[f'{x}mlp.fc1.{leaf}']
      sd[f'{b}ff.net.2.{leaf}'] = o[f'{x}mlp.fc2.{leaf}']
  table = o['y_embedder.embedding_table.weight']
  sd.update({f'transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight': table
             for i in range(num_layers)})
  return sd


def dit_original(ref, num_layers: int) -> dict:
  """facebookresearch's DiT file of a diffusers ``DiTTransformer2DModel`` whose blocks share one embedder."""
  sd = ref.state_dict()
  emb = 'transformer_blocks.0.norm1.emb.'
  out = {'pos_embed': ref.pos_embed.pos_embed.clone(),  # the fixed sin-cos table DiT stores (unused by diffusers)
         'y_embedder.embedding_table.weight': sd[emb + 'class_embedder.embedding_table.weight']}
  for original, name in (('x_embedder.proj', 'pos_embed.proj'), ('final_layer.adaLN_modulation.1', 'proj_out_1'),
                         ('final_layer.linear', 'proj_out_2'),
                         ('t_embedder.mlp.0', emb + 'timestep_embedder.linear_1'),
                         ('t_embedder.mlp.2', emb + 'timestep_embedder.linear_2')):
    put(out, sd, original, name)
  for i in range(num_layers):
    b, x = f'transformer_blocks.{i}.', f'blocks.{i}.'
    put(out, sd, x + 'attn.qkv', *(f'{b}attn1.to_{p}' for p in 'qkv'))
    for original, name in (('adaLN_modulation.1', 'norm1.linear'), ('attn.proj', 'attn1.to_out.0'),
                           ('mlp.fc1', 'ff.net.0.proj'), ('mlp.fc2', 'ff.net.2')):
      put(out, sd, x + original, b + name)
  return out


class _TorchAtWidth:
  """diffusers' ``torch`` for its FLUX.1 converter at a tiny width: the converter splits each single block's
  fused ``linear1`` at FLUX.1's hard-coded (3072, 3072, 3072, 12288) rows; this splits at the same proportions
  (1 : 1 : 1 : 4) of the tensor's own rows. Nothing else changes."""

  def __init__(self, width: int):
    self.width = width

  def __getattr__(self, name):
    return getattr(torch, name)

  def split(self, tensor, sizes, dim=0):
    if tuple(sizes) == (3072, 3072, 3072, 12288):
      sizes = (self.width,) * 3 + (4 * self.width,)
    return torch.split(tensor, sizes, dim)


def assert_same_state(got: dict, want: dict):
  assert got.keys() == want.keys(), (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
  assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def write(path, state: dict) -> str:
  write_safetensors(path, {k: v.numpy() for k, v in state.items()})
  return str(path)


def assert_params_as_from_folder(params, ref, folder):
  """The file's parameters are, bit for bit, those of the model's diffusers folder; returns the folder's module."""
  ref.save_pretrained(folder)
  module, want = load_pretrained(folder)
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True))
  return module


# -- parity ---------------------------------------------------------------------------------------------------------
def make_sd3(variant: str):
  ref = jiggle(diffusers.SD3Transformer2DModel(**SD3_COMMON, **SD3[variant]))
  return ref, sd3_original(ref.state_dict(), SD3_COMMON['num_layers'])


@pytest.mark.parametrize('variant', list(SD3))
def test_sd3_file_matches_diffusers(variant, tmp_path):
  ref, original = make_sd3(variant)
  converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
  assert_same_state(converted, ref.state_dict())  # the file is what diffusers reads
  other = {'first_stage_model.decoder.conv_in.weight': torch.zeros(8, 4, 3, 3)}  # another model in the file
  loaded = load_pretrained(write(tmp_path / f'{variant}.safetensors', original | other))
  assert loaded.keys() == {'transformer'}
  m, params = loaded['transformer']
  folder_module = assert_params_as_from_folder(params, ref, tmp_path / 'folder')
  # sample_size is not stored: the file's table serves 16 x 2 latent rows, less than Stability's 128
  assert isinstance(m, MMDiT) and m.config == dataclasses.replace(folder_module.config, sample_size=32)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
  t = np.array([3.0, 987.5], np.float32)
  context = rng.standard_normal((2, 7, 16)).astype(np.float32)
  pooled = rng.standard_normal((2, 12)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(context), torch.from_numpy(pooled),
               torch.from_numpy(t)).sample.numpy()
  got = np.asarray(jax.jit(m.apply)({'params': params}, x.transpose(0, 2, 3, 1), t, context, pooled))
  worst = float(np.abs(got.transpose(0, 3, 1, 2) - want).max() / np.abs(want).max())
  print(f'single-file {variant}: max abs diff / max |out| {worst:.2e}')
  assert worst <= bound(2, max(256, 4 * m.config.width))  # the MLP's sum: 4 D terms


def make_flux(guidance: bool):
  ref = jiggle(diffusers.FluxTransformer2DModel(**FLUX, guidance_embeds=guidance))
  return ref, flux_original(ref.state_dict(), FLUX['num_layers'], FLUX['num_single_layers'])


@pytest.mark.parametrize('variant', ['flux-dev', 'flux-schnell'])
def test_flux_file_matches_diffusers(variant, tmp_path, monkeypatch):
  ref, original = make_flux(variant == 'flux-dev')
  width = FLUX['attention_head_dim'] * FLUX['num_attention_heads']
  monkeypatch.setattr(single_file_utils, 'torch', _TorchAtWidth(width))
  converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
  monkeypatch.undo()
  assert_same_state(converted, ref.state_dict())
  if variant == 'flux-schnell':  # ComfyUI-style files put the same keys under model.diffusion_model.
    original = {PREFIX + k: v for k, v in original.items()}
  (m, params), = load_pretrained(write(tmp_path / f'{variant}.safetensors', original)).values()
  folder_module = assert_params_as_from_folder(params, ref, tmp_path / 'folder')
  assert isinstance(m, Flux) and m.config == folder_module.config
  assert m.config.guidance_embeds == (variant == 'flux-dev') and m.config.axes_dims_rope == (4, 14, 14)
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((2, 24, 16)).astype(np.float32)  # 4 x 6 packed latent tokens
  img_ids, txt_ids = image_ids(4, 6), np.zeros((7, 3), np.float32)
  context = rng.standard_normal((2, 7, 12)).astype(np.float32)
  pooled = rng.standard_normal((2, 10)).astype(np.float32)
  t = np.array([0.25, 0.9], np.float32)
  scale = np.array([3.5, 1.0], np.float32) if variant == 'flux-dev' else None
  got, want = flux_outputs(ref, m, params, tokens, context, pooled, t, scale, img_ids, txt_ids)
  worst = float(np.abs(got - want).max() / np.abs(want).max())
  print(f'single-file {variant}: max abs diff / max |out| {worst:.2e}')
  assert worst <= bound(3, 5 * width)  # 1 double + 2 single blocks; a single block's proj_out sums 5 D terms


def make_dit():
  ref = jiggle(diffusers.DiTTransformer2DModel(**DIT))
  with torch.no_grad():  # DiT has one embedder, which diffusers copies into every block
    for block in ref.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
  return ref, dit_original(ref, DIT['num_layers'])


def test_dit_file_matches_diffusers(tmp_path):
  ref, original = make_dit()
  assert_same_state(dit_script(original, DIT['num_layers']), ref.state_dict())
  torch.save(original, tmp_path / 'DiT-tiny.pt')  # the released files are PyTorch pickles
  (m, params), = load_pretrained(tmp_path / 'DiT-tiny.pt', allow_pickle=True).values()
  folder_module = assert_params_as_from_folder(params, ref, tmp_path / 'folder')
  assert isinstance(m, DiT) and m.config == folder_module.config
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, y = np.array([3, 999]), np.array([1, 10])  # 10: the null label
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
  got = np.asarray(jax.jit(m.apply)({'params': params}, x.transpose(0, 2, 3, 1), t, y)).transpose(0, 3, 1, 2)
  worst = float(np.abs(got - want).max() / np.abs(want).max())
  print(f'single-file dit: max abs diff / max |out| {worst:.2e}')
  assert worst <= bound(2, 4 * m.config.width)


# -- errors ---------------------------------------------------------------------------------------------------------
def test_a_file_of_no_known_family_is_one_error_naming_it(tmp_path):
  path = write(tmp_path / 'bert.safetensors', {'encoder.layer.0.attention.self.query.weight': torch.zeros(4, 4)})
  with pytest.raises(ValueError, match='not a single-file checkpoint diffjax reads') as e:
    load_pretrained(path)
  assert path in str(e.value) and 'FLUX.1' in str(e.value) and 'Stable Diffusion' in str(e.value)
  (tmp_path / 'junk.safetensors').write_bytes(b'not a checkpoint at all')
  with pytest.raises(WeightFileError, match='junk.safetensors'):
    load_pretrained(tmp_path / 'junk.safetensors')
  with pytest.raises(ValueError, match='unknown transformer variant'):
    transformer_from_original({}, path, variant='sdxl')


def test_another_variant_is_one_error_naming_the_file_and_what_it_holds(tmp_path):
  dev = write(tmp_path / 'dev.safetensors', make_flux(True)[1])
  with pytest.raises(WeightMismatchError, match=r'expected a FLUX.1 \[schnell\] checkpoint, but the file holds a '
                                                r'FLUX.1 \[dev\] one: .*guidance_in') as e:
    transformer_from_original(read_weights(dev), dev, variant='flux-schnell')
  assert dev in str(e.value)
  m, _ = transformer_from_original(read_weights(dev), dev, variant='flux-dev')
  assert m.config.guidance_embeds
  sd35 = write(tmp_path / 'sd35.safetensors', make_sd3('sd3.5')[1])
  with pytest.raises(WeightMismatchError, match=r'expected a Stable Diffusion 3 \(MMDiT\) checkpoint.*ln_q'):
    transformer_from_original(read_weights(sd35), sd35, variant='sd3')
  with pytest.raises(WeightMismatchError, match='expected a DiT checkpoint'):
    transformer_from_original(read_weights(sd35), sd35, variant='dit')


def test_a_truncated_or_incomplete_file_is_one_error_naming_what_is_missing(tmp_path):
  _, sd3 = make_sd3('sd3')
  cut = write(tmp_path / 'sd3-cut.safetensors', {k: v for k, v in sd3.items() if '.joint_blocks.1.' not in k})
  with pytest.raises(WeightMismatchError, match=r'last joint block \(joint_blocks.0.context_block\).*truncated') as e:
    load_pretrained(cut)
  assert cut in str(e.value)
  _, flux = make_flux(False)
  gap = write(tmp_path / 'flux-gap.safetensors',
              {k: v for k, v in flux.items() if not k.startswith('single_blocks.0.')})
  with pytest.raises(WeightMismatchError, match=r'missing block\(s\) single_blocks.0 below single_blocks.1') as e:
    load_pretrained(gap)
  assert gap in str(e.value)
  _, dit = make_dit()
  del dit['blocks.1.mlp.fc2.weight']
  incomplete = write(tmp_path / 'dit-incomplete.safetensors', dit)
  with pytest.raises(WeightMismatchError, match='1 missing, 0 unexpected') as e:
    load_pretrained(incomplete)
  assert incomplete in str(e.value) and 'transformer_blocks.1.ff.net.2.weight' in str(e.value)
  with pytest.raises(ValueError, match='an original Stable Diffusion 3 .* transformer checkpoint, not a Stable '
                                       'Diffusion 1.x / 2.x one'):
    models_from_ldm(read_weights(cut), cut)
