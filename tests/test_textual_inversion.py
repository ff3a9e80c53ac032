"""Textual inversion: files, added tokens and token-table rows; parity with diffusers' load_textual_inversion.

The unit tests run a tiny random diffjax CLIP text encoder on a small BPE vocabulary trained in
the test. The reference tests build tiny transformers CLIP encoders (SD: one; SDXL: two of
different widths, the second with a projection and the legacy ``eos_token_id=2`` pooling at the
largest id, which an added token then is), load the same files with diffusers'
``TextualInversionLoaderMixin.load_textual_inversion`` on pipelines without U-Net / VAE, and compare
token ids (exactly) and ``encode_prompt``'s states (within a float32 bound) with diffjax.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tolerances
from test_tokenizers import CORPUS, write_clip_files

from diffjax.adapters import textual_inversion as ti
from diffjax.convert.files import PickleRefusedError
from diffjax.models.text import CLIPTextConfig, CLIPTextTransformer
from diffjax.models.tokenizers import CLIPTokenizer

LENGTH = 16  # the tokenizers' max_length and the encoders' positions
WIDTH, WIDTH_2 = 32, 24  # SD's (SDXL's clip_l) and SDXL's clip_g hidden sizes
PROMPTS = ['a photo of <cat-toy> on a sofa', 'a painting of <style>, <cat-toy> and <ann>', 'a<cat-toy>s in <STYLE>',
           'a dog']


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  """(vocab, (vocab.json, merges.txt)) of a small BPE vocabulary."""
  return write_clip_files(str(tmp_path_factory.mktemp('ti_tokenizer')), CORPUS + PROMPTS)


def _tokenizer(clip_files, **kw) -> CLIPTokenizer:
  return CLIPTokenizer.from_files(*clip_files[1], max_length=LENGTH, **kw)


@pytest.fixture(scope='module')
def tiny(clip_files):
  """(tokenizer, encoder module, random params) of a tiny diffjax CLIP text encoder over the vocabulary."""
  vocab = clip_files[0]
  config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=37, num_layers=2, num_heads=4,
                          max_positions=LENGTH, eos_token_id=vocab['<|endoftext|>'])
  module = CLIPTextTransformer(config)
  # Random leaves of init's shapes (eval_shape compiles nothing; an eager init takes seconds): 0.1 N(0, 1),
  # LayerNorm scales around 1.
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (float(path[-1].key == 'scale') + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
  return _tokenizer(clip_files), module, params


def _vectors(n, d, seed=0):
  return (0.1 * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32)


# -- tokenizer ----------------------------------------------------------------------------------------------------
def test_added_tokens_are_single_ids_after_the_vocabulary(clip_files):
  base = _tokenizer(clip_files)
  v = base.vocab_size
  tok = base.with_added_tokens(['<cat-toy>', '<cat-toy>_1', 'My  Tok'])
  assert tok.vocab_size == v + 3 and tok.added == {'<cat-toy>': v, '<cat-toy>_1': v + 1, 'My  Tok': v + 2}
  assert base.vocab_size == v and not base.added  # the original is unchanged
  assert base.encode('a <cat-toy> x') == base.encode('a < cat - toy > x')  # (BPE'd by the original)
  # Matched anywhere, longest first, on normalized text (case and whitespace), the rest BPE'd around it.
  assert tok.encode('a<cat-toy>s') == base.encode('a') + [v] + base.encode('s')
  assert tok.encode('<CAT-TOY>_1 and <cat-toy>_12') == [v + 1] + base.encode('and') + [v + 1] + base.encode('2')
  assert tok.encode('my   tok') == [v + 2] and tok.tokenize('MY TOK') == ['my tok']
  assert tok.encode('a photo of a cat') == base.encode('a photo of a cat')
  assert tok.decode(tok('a <cat-toy> photo').input_ids[0]) == 'a <cat-toy> photo'
  for bad, match in [('<|endoftext|>', 'already in'), ('<cat-toy>', 'already in'), ('<Cat-Toy>', 'normalizes'),
                     ('  ', 'non-empty')]:
    with pytest.raises(ValueError, match=match):
      tok.with_added_tokens([bad])


@pytest.mark.reference
def test_added_tokens_match_transformers(clip_files):
  transformers = pytest.importorskip('transformers')
  added = ['<cat-toy>', '<cat-toy>_1', '<cat-toy>_2', '<Dog>', 'sks', 'my  tok', 'cats']
  ref = transformers.CLIPTokenizer(*clip_files[1], model_max_length=LENGTH)
  ref.add_tokens(added)
  ours = _tokenizer(clip_files).with_added_tokens(added)
  texts = PROMPTS + ['a<cat-toy>_1s', '<CAT-TOY>_2<cat-toy>', 'a <dog> and <Dog>', 'asksb sks', 'MY   tok, cats!',
                     'a cat, cats', '<cat-toy>_12', 'no added token here']
  for text in texts:
    assert ours.tokenize(text) == ref.tokenize(text), text
    want = ref(text, padding='max_length', max_length=LENGTH, truncation=True)['input_ids']
    assert ours(text).input_ids[0].tolist() == want, text


# -- files --------------------------------------------------------------------------------------------------------
def test_read_and_write_every_form(tmp_path):
  vec, vecs, vecs_g = _vectors(1, WIDTH)[0], _vectors(3, WIDTH, 1), _vectors(3, WIDTH_2, 2)
  single = ti.read_embedding({'<style>': vec})  # diffusers, (D,)
  assert single.token == '<style>' and single.tokens == ['<style>'] and single.vectors[0].shape == (1, WIDTH)
  multi = ti.read_embedding({'<cat-toy>': vecs}, token='<toy>')  # a token= overrides the file's
  assert multi.tokens == ['<toy>', '<toy>_1', '<toy>_2']
  a1111 = ti.read_embedding({'string_to_param': {'*': vecs}, 'name': 'charturner', 'step': 1000})
  assert a1111.token == 'charturner' and np.array_equal(a1111.vectors[0], vecs)
  safetensors.numpy.save_file({'emb_params': vecs}, str(tmp_path / 'charturner.safetensors'))
  assert ti.read_embedding(tmp_path / 'charturner.safetensors').token == 'charturner'  # A1111: the file's stem
  sdxl = ti.Embedding('<s>', (vecs, vecs_g))
  ti.write_embedding(tmp_path / 'sdxl.safetensors', sdxl)
  assert sorted(safetensors.numpy.load_file(str(tmp_path / 'sdxl.safetensors'))) == ['clip_g', 'clip_l']
  back = ti.read_embedding(tmp_path / 'sdxl.safetensors', token='<s>')
  assert back.token == '<s>' and all(np.array_equal(a, b) for a, b in zip(back.vectors, sdxl.vectors, strict=True))
  assert ti.read_embedding(tmp_path / 'sdxl.safetensors').token == 'sdxl'
  ti.write_embedding(tmp_path / 'learned_embeds.safetensors', multi)
  assert list(safetensors.numpy.load_file(str(tmp_path / 'learned_embeds.safetensors'))) == ['<toy>']
  assert np.array_equal(ti.read_embedding(tmp_path / 'learned_embeds.safetensors').vectors[0], vecs)

  with pytest.raises(ValueError, match='not a textual inversion embedding'):
    ti.read_embedding({'a': vec, 'b': vec})
  with pytest.raises(ValueError, match="'string_to_param' must be"):
    ti.read_embedding({'string_to_param': {'x': vecs}, 'name': 'n'})
  with pytest.raises(ValueError, match='names no token'):
    ti.read_embedding({'clip_l': vecs, 'clip_g': vecs_g})
  with pytest.raises(ValueError, match=r"'<x>'.*shape \(1, 2, 3\)"):
    ti.read_embedding({'<x>': np.zeros((1, 2, 3), np.float32)})
  with pytest.raises(ValueError, match='one .n, D. array per text encoder'):
    ti.Embedding('<x>', vecs)
  with pytest.raises(ValueError, match='same number of vectors'):
    ti.read_embedding({'clip_l': vecs, 'clip_g': vecs_g[:2]}, token='<s>')
  with pytest.raises(ValueError, match='written as .safetensors'):
    ti.write_embedding(tmp_path / 'learned_embeds.bin', multi)
  (tmp_path / 'learned_embeds.bin').write_bytes(b'not read')
  with pytest.raises(PickleRefusedError, match='learned_embeds.bin'):
    ti.read_embedding(tmp_path / 'learned_embeds.bin')


def test_expand_prompt_writes_every_vector_token(clip_files):
  tok = _tokenizer(clip_files).with_added_tokens(ti.vector_tokens('<cat-toy>', 3) + ['<style>'])
  assert ti.expand_prompt(tok, 'a <cat-toy> in <style>') == 'a <cat-toy> <cat-toy>_1 <cat-toy>_2 in <style>'
  assert ti.expand_prompt(tok, ['a<cat-toy>s', 'a dog']) == ['a<cat-toy> <cat-toy>_1 <cat-toy>_2s', 'a dog']
  # As diffusers: the replacement is of the text as tokenized (normalized), so other spellings keep one vector.
  assert ti.expand_prompt(tok, 'a <CAT-TOY>') == 'a <CAT-TOY>'
  assert tok.encode(ti.expand_prompt(tok, '<cat-toy>')) == list(range(tok.vocab_size - 4, tok.vocab_size - 1))


# -- parameter trees ----------------------------------------------------------------------------------------------
def test_extended_table_applies_and_trains_only_the_new_rows(tiny):
  tok, module, params = tiny
  n = 3
  rows = _vectors(n, WIDTH)
  (tok2,), (text,) = ti.add_embedding(ti.Embedding('<cat-toy>', (rows,)), [tok], [params])
  table = ti.token_table(params)
  assert ti.token_table(text).shape == (table.shape[0] + n, WIDTH)
  with pytest.raises(Exception, match='shape'):  # Flax checks the table against the config: fit_config is needed
    module.apply({'params': text}, jnp.zeros((1, LENGTH), jnp.int32))
  encoder = module.clone(config=ti.fit_config(module.config, text))
  assert encoder.config.vocab_size == tok2.vocab_size == table.shape[0] + n
  ids = jnp.asarray(tok2(ti.expand_prompt(tok2, ['a <cat-toy> photo', 'a photo'])).input_ids)
  out = encoder.apply({'params': text}, ids, output_hidden_states=True)
  # A prompt without new tokens is unchanged; the new tokens' embeddings are the rows (+ positions).
  same = module.apply({'params': params}, ids.at[0].set(ids[1])).last_hidden_state  # same shapes: same program
  np.testing.assert_array_equal(out.last_hidden_state[1], same[1])
  pos = np.asarray(params['embeddings']['position_embedding']['embedding'])
  np.testing.assert_array_equal(out.hidden_states[0][0, 2:2 + n], rows + pos[2:2 + n])

  base, new = ti.split_embeddings(text, n)
  np.testing.assert_array_equal(new, rows)
  assert jax.tree.all(jax.tree.map(np.array_equal, base, params))

  def loss(r, ids):
    return jnp.sum(encoder.apply({'params': ti.extend_embeddings(base, r)}, ids).last_hidden_state ** 2)

  grads = jax.jit(jax.grad(loss))(new, ids[:1, :4])  # bos, 'a', <cat-toy>, <cat-toy>_1: the last row unused
  assert grads.shape == (n, WIDTH) and np.all(np.abs(grads[:2]).sum(-1) > 0) and not np.any(grads[2])
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)  # rows are cast to the table's dtype
  assert ti.token_table(ti.extend_embeddings(bf16, new)).dtype == jnp.bfloat16

  back = ti.extract_embedding('<cat-toy>', [tok2], [text])
  assert back.token == '<cat-toy>' and np.array_equal(back.vectors[0], rows)
  init = ti.initial_vectors(tok, params, 'photo', 2)
  np.testing.assert_array_equal(init, np.repeat(table[tok.encode('photo')], 2, axis=0))
  with pytest.raises(ValueError, match='must be one'):
    ti.initial_vectors(tok, params, 'a photo')


def test_add_embedding_errors_name_the_file_and_token(tiny, tmp_path):
  tok, _, params = tiny
  path = tmp_path / 'learned_embeds.safetensors'
  safetensors.numpy.save_file({'<wide>': _vectors(2, 768)}, str(path))
  with pytest.raises(ValueError, match=rf"{path}: token '<wide>' has vectors of width 768 but text_encoder "
                                       rf'expects D = {WIDTH}'):
    ti.load_textual_inversion(path, [tok], [params])
  with pytest.raises(ValueError, match=r"token 'photo</w>' is already in text_encoder's tokenizer vocabulary"):
    ti.add_embedding(ti.Embedding('photo</w>', (_vectors(1, WIDTH),)), [tok], [params])
  (tok2,), (text,) = ti.add_embedding(ti.Embedding('<x>_1', (_vectors(1, WIDTH),)), [tok], [params])
  with pytest.raises(ValueError, match=r"token '<x>_1' is already"):  # a multi-vector token's companion is taken
    ti.add_embedding(ti.Embedding('<x>', (_vectors(2, WIDTH),)), [tok2], [text])
  sdxl = tmp_path / 'sdxl.safetensors'
  ti.write_embedding(sdxl, ti.Embedding('<s>', (_vectors(2, WIDTH), _vectors(2, WIDTH_2))))
  with pytest.raises(ValueError, match=f'{sdxl}: an SDXL embedding .* the pipeline has one text encoder'):
    ti.load_textual_inversion(sdxl, [tok], [params], token='<s>')
  one = ti.Embedding('<o>', (_vectors(1, WIDTH),), 'one.safetensors')
  with pytest.raises(ValueError, match="one.safetensors: an embedding for 1 text encoder.* 'clip_l' and 'clip_g'"):
    ti.add_embedding(one, [tok, tok], [params, params])
  with pytest.raises(ValueError, match='tokenizer has .* ids but the token table has'):
    ti.add_embedding(one, [tok.with_added_tokens(['<y>'])], [params])
  with pytest.raises(ValueError, match='no token table'):
    ti.add_embedding(one, [tok], [{'text_encoder': params}])


# -- parity with diffusers ----------------------------------------------------------------------------------------
def _perturbed_clip(transformers, torch, vocab, cls, hidden, seed, **extra):
  torch.manual_seed(seed)
  model = cls(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=LENGTH, bos_token_id=vocab['<|startoftext|>'], pad_token_id=vocab['<|endoftext|>'],
      **({'eos_token_id': vocab['<|endoftext|>']} | extra)))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _to_diffjax(model):
  from diffjax.convert.configs import clip_text_config_from_transformers
  from diffjax.convert.pretrained import build
  config = clip_text_config_from_transformers(dict(model.config.to_dict(), architectures=[type(model).__name__]))
  return build('clip', config, {k: v.detach().numpy() for k, v in model.state_dict().items()})


def _state_bound(states, num_layers=2, k=37):
  """A float32 bound on |diffjax - transformers| for CLIP states of magnitude up to max|states|.

  Each layer applies 8 contractions (q, k, v, scores, attention-weighted sum, out, fc1, fc2) of
  length <= k = max(hidden 32, intermediate 37, 16 positions); each is within gamma(k + 4) (4 for
  the softmax / GELU / LayerNorm transcendentals) of sum |a_i b_i|, which for random-sign terms is
  ~sqrt(k) times |sum a_i b_i| ~ the state's scale. Two implementations each err so: 2 L 8 sqrt(k)
  gamma(k + 4) max|h| ~ 3e-4 max|h|; measured about 1e-6 max|h|. A wrong or permuted vector moves
  the states by ~max|h| (checked), so the bound has teeth.
  """
  return 2 * num_layers * 8 * math.sqrt(k) * tolerances.gamma(k + tolerances.TRANSCENDENTAL_OPS) * float(
      np.abs(states).max())


@pytest.fixture(scope='module')
def reference():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  diffusers = pytest.importorskip('diffusers')
  return torch, transformers, diffusers


def _sd(reference, clip_files):
  """A fresh diffusers StableDiffusionPipeline of a tiny text encoder (no U-Net, VAE or scheduler)."""
  torch, transformers, diffusers = reference
  text = _perturbed_clip(transformers, torch, clip_files[0], transformers.CLIPTextModel, WIDTH, 0)
  return diffusers.StableDiffusionPipeline(
      vae=None, text_encoder=text, tokenizer=transformers.CLIPTokenizer(*clip_files[1], model_max_length=LENGTH),
      unet=None, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _encode_sd(pipe, prompts):
  import torch
  with torch.no_grad():
    return pipe.encode_prompt(prompts, 'cpu', 1, False)[0].numpy()


@pytest.mark.reference
@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::DeprecationWarning')
def test_sd_matches_diffusers_load_textual_inversion(reference, clip_files, tmp_path):
  torch = reference[0]
  ref = _sd(reference, clip_files)
  module, params = _to_diffjax(ref.text_encoder)
  toy, style, ann = _vectors(3, WIDTH, 1), _vectors(1, WIDTH, 2)[0], _vectors(2, WIDTH, 3)
  safetensors.numpy.save_file({'<cat-toy>': toy}, str(tmp_path / 'toy.safetensors'))  # multi-vector
  safetensors.numpy.save_file({'<style>': style}, str(tmp_path / 'style.safetensors'))  # one vector, (D,)
  a1111 = {'string_to_param': {'*': torch.from_numpy(ann).requires_grad_()}, 'name': '<ann>', 'step': 500}
  ref.load_textual_inversion(str(tmp_path / 'toy.safetensors'))
  ref.load_textual_inversion(str(tmp_path / 'style.safetensors'))
  ref.load_textual_inversion(a1111)

  tokenizers, text = [CLIPTokenizer.from_files(*clip_files[1], max_length=LENGTH)], [params]
  for source in (tmp_path / 'toy.safetensors', tmp_path / 'style.safetensors', a1111):
    tokenizers, text = ti.load_textual_inversion(source, tokenizers, text)
  (tok,), (text,) = tokenizers, text
  encoder = module.clone(config=ti.fit_config(module.config, text))

  expanded = ti.expand_prompt(tok, PROMPTS)
  assert expanded == ref.maybe_convert_prompt(PROMPTS, ref.tokenizer)
  ids = tok(expanded).input_ids
  want = ref.tokenizer(expanded, padding='max_length', max_length=LENGTH, truncation=True)['input_ids']
  np.testing.assert_array_equal(ids, want)
  v = len(clip_files[0])
  i = list(ids[0]).index(v)
  assert list(ids[0, i:i + 3]) == [v, v + 1, v + 2] and v + 5 in ids[1]  # <cat-toy>'s three vectors; <ann>_1

  expected = _encode_sd(ref, PROMPTS)
  got = np.asarray(jax.jit(encoder.apply)({'params': text}, jnp.asarray(ids)).last_hidden_state)
  bound = _state_bound(expected)
  diff = float(np.abs(got - expected).max())
  print(f'textual inversion SD: max |diffjax - diffusers| {diff:.2e} (bound {bound:.2e}, max|h| '
        f'{np.abs(expected).max():.2f})')
  tolerances.assert_within(got, expected, bound, 'SD prompt states')
  swapped = ti.extend_embeddings(ti.split_embeddings(text, 6)[0], ti.split_embeddings(text, 6)[1][::-1])
  wrong = np.asarray(jax.jit(encoder.apply)({'params': swapped}, jnp.asarray(ids)).last_hidden_state)
  assert np.abs(wrong - expected).max() > 100 * bound  # the vectors' order matters far beyond the bound

  # Round trip: diffjax writes the learned rows, a fresh diffusers pipeline loads them, same states.
  path = tmp_path / 'learned_embeds.safetensors'
  ti.write_embedding(path, ti.extract_embedding('<cat-toy>', [tok], [text]))
  assert np.array_equal(safetensors.numpy.load_file(str(path))['<cat-toy>'], toy)
  fresh = _sd(reference, clip_files)
  fresh.load_textual_inversion(str(tmp_path))  # finds learned_embeds.safetensors, diffusers' name
  np.testing.assert_array_equal(_encode_sd(fresh, PROMPTS[:1]), _encode_sd(ref, PROMPTS[:1]))  # same batch: bits


@pytest.mark.reference
@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::DeprecationWarning')
def test_sdxl_extends_both_encoders_like_diffusers(reference, clip_files, tmp_path):
  torch, transformers, diffusers = reference
  vocab, files = clip_files
  ref = diffusers.StableDiffusionXLPipeline(
      vae=None, unet=None, scheduler=None,
      text_encoder=_perturbed_clip(transformers, torch, vocab, transformers.CLIPTextModel, WIDTH, 0),
      # the release's legacy eos_token_id=2: pooled at the largest id, here an added token's
      text_encoder_2=_perturbed_clip(transformers, torch, vocab, transformers.CLIPTextModelWithProjection, WIDTH_2, 1,
                                     projection_dim=16, eos_token_id=2),
      tokenizer=transformers.CLIPTokenizer(*files, model_max_length=LENGTH),
      tokenizer_2=transformers.CLIPTokenizer(*files, model_max_length=LENGTH, pad_token='!'),
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  (m1, p1), (m2, p2) = _to_diffjax(ref.text_encoder), _to_diffjax(ref.text_encoder_2)
  path = tmp_path / 'sdxl_emb.safetensors'
  vectors = (_vectors(2, WIDTH, 4), _vectors(2, WIDTH_2, 5))
  safetensors.numpy.save_file(dict(zip(ti.SDXL_KEYS, vectors, strict=True)), str(path))
  state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(path)).items()}
  ref.load_textual_inversion(state['clip_l'], token='<cat-toy>', text_encoder=ref.text_encoder,
                             tokenizer=ref.tokenizer)
  ref.load_textual_inversion(state['clip_g'], token='<cat-toy>', text_encoder=ref.text_encoder_2,
                             tokenizer=ref.tokenizer_2)

  tokenizers = [CLIPTokenizer.from_files(*files, max_length=LENGTH),
                CLIPTokenizer.from_files(*files, max_length=LENGTH, pad_token='!')]
  tokenizers, (t1, t2) = ti.load_textual_inversion(path, tokenizers, [p1, p2], token='<cat-toy>')
  assert [ti.token_table(t).shape for t in (t1, t2)] == [(len(vocab) + 2, WIDTH), (len(vocab) + 2, WIDTH_2)]
  e1, e2 = m1.clone(config=ti.fit_config(m1.config, t1)), m2.clone(config=ti.fit_config(m2.config, t2))

  prompts = PROMPTS[:1] + PROMPTS[2:]
  ids = []
  for ours, theirs in zip(tokenizers, (ref.tokenizer, ref.tokenizer_2), strict=True):
    expanded = ti.expand_prompt(ours, prompts)
    assert expanded == ref.maybe_convert_prompt(prompts, theirs)
    ids.append(ours(expanded).input_ids)
    np.testing.assert_array_equal(ids[-1], theirs(expanded, padding='max_length', max_length=LENGTH,
                                                  truncation=True)['input_ids'])
  h1, h2 = (jax.jit(lambda p, i, e=e: e.apply({'params': p}, i, output_hidden_states=True))(p, jnp.asarray(i))
            for e, p, i in ((e1, t1, ids[0]), (e2, t2, ids[1])))
  got = np.concatenate([h1.hidden_states[-2], h2.hidden_states[-2]], axis=-1)
  with torch.no_grad():
    states, _, pooled, _ = ref.encode_prompt(prompts, device='cpu', do_classifier_free_guidance=False)
  states, pooled = states.numpy(), pooled.numpy()
  bound = _state_bound(states)
  print(f'textual inversion SDXL: max |diffjax - diffusers| states {np.abs(got - states).max():.2e}, pooled '
        f'{np.abs(np.asarray(h2.pooled) - pooled).max():.2e} (bound {bound:.2e})')
  tolerances.assert_within(got, states, bound, 'SDXL prompt states')
  # pooled: one more contraction (the projection, length 24) on states bounded as above
  tolerances.assert_within(h2.pooled, pooled, 2 * _state_bound(pooled), 'SDXL pooled')

  back = ti.extract_embedding('<cat-toy>', tokenizers, [t1, t2])
  ti.write_embedding(tmp_path / 'back.safetensors', back)
  written = safetensors.numpy.load_file(str(tmp_path / 'back.safetensors'))
  assert all(np.array_equal(written[k], v) for k, v in zip(ti.SDXL_KEYS, vectors, strict=True))
