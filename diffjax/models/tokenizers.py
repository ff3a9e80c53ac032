"""Tokenizers for the text encoders, pure Python + NumPy (T5's through the ``tokenizers`` library).

* ``CLIPTokenizer``: CLIP's byte-level BPE from the ``vocab.json`` / ``merges.txt`` you
  supply (Radford et al. 2021; Sennrich et al. 2016): NFC, whitespace collapsed,
  lowercase; words split by CLIP's pattern; ``</w>`` marks the end of a word;
  ``<|startoftext|> ... <|endoftext|>``, padded / truncated to 77. ``with_added_tokens``
  adds whole-string tokens (textual inversion's placeholders), matched before BPE as
  transformers' ``add_tokens`` does.
* ``WordPieceTokenizer``: BERT (uncased) basic tokenization and greedy
  longest-match-first WordPiece from a ``vocab.txt`` (Devlin et al. 2019).
* ``T5Tokenizer``: T5's SentencePiece unigram model from a ``tokenizer.json``, run by the
  ``tokenizers`` library (as transformers' ``T5TokenizerFast``), ``</s>`` appended, ``<pad>``-padded.
* ``ByteTokenizer``: UTF-8 bytes + 3 special ids; needs no file (models trained from scratch).

Each is called on a string or a list of strings and returns a ``Tokens`` of int32
arrays (B, max_length): ``input_ids`` and ``attention_mask`` (1 = token, 0 = padding).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol

import numpy as np

try:  # the exact CLIP pattern needs Unicode properties (\p{L}); ``re`` approximates them
  import regex as _regex
except ImportError:  # pragma: no cover
  _regex = None

_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_PATTERN_RE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""


@dataclasses.dataclass(frozen=True)
class Tokens:
  """input_ids (B, L) int32 and attention_mask (B, L) int32 (1 = token, 0 = padding)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray


def _batch(seqs: list[list[int]], max_length: int | None, pad_id: int, pad: bool) -> Tokens:
  n = max_length if (pad and max_length) else max(len(s) for s in seqs)
  ids = np.full((len(seqs), n), pad_id, np.int32)
  mask = np.zeros((len(seqs), n), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return Tokens(ids, mask)


def _wrap(body: list[int], bos: int | None, eos: int | None, max_length: int | None) -> list[int]:
  n_special = (bos is not None) + (eos is not None)
  if max_length is not None:
    body = body[:max_length - n_special]
  return ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])


# -- CLIP byte-level BPE ---------------------------------------------------------------------------------------
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable character map of byte-level BPE (GPT-2, CLIP): printable Latin-1 bytes map to
  themselves, the other 68 bytes to code points 256, 257, ..."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


def _split_added(pattern: re.Pattern | None, text: str) -> list[tuple[str, bool]]:
  """``text`` as (piece, is an added token) in order, the added tokens being what ``pattern`` matches."""
  if pattern is None:
    return [(text, False)]
  out, start = [], 0
  for m in pattern.finditer(text):
    out += [(text[start:m.start()], False), (m.group(), True)]
    start = m.end()
  return out + [(text[start:], False)]


class CLIPTokenizer:
  """CLIP BPE tokenizer.

  Args:
    vocab: token -> id (``vocab.json``); merges: ordered pairs (``merges.txt`` lines).
    max_length: pad / truncate to this many ids including bos and eos (77 for SD).
    pad_token: padding token (SD 1.x: ``<|endoftext|>``; SD 2.x OpenCLIP pads with ``!``, id 0).

  Added tokens (``with_added_tokens``, none by default) are transformers' non-special added
  tokens: ``added`` maps each token, as given, to its id ``len(vocab), len(vocab) + 1, ...`` in
  the order added. A text is normalized first (NFC, whitespace collapsed, lowercase); the
  normalized forms of the added tokens are then found anywhere in it, also inside words (at each
  position the longest, leftmost first: the ``tokenizers`` library's leftmost-longest match), and
  only the text between them goes through CLIP's pattern and BPE.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], max_length: int = 77,
               bos_token: str = '<|startoftext|>', eos_token: str = '<|endoftext|>', pad_token: str | None = None):
    self.vocab = dict(vocab)
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.max_length = max_length
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id = self.vocab[pad_token or eos_token]
    self.unk_id = self.eos_id
    self.specials = {bos_token: self.bos_id, eos_token: self.eos_id}
    self.byte_map = bytes_to_unicode()
    self.pattern = _regex.compile(_CLIP_PATTERN) if _regex else re.compile(_CLIP_PATTERN_RE)
    self._cache: dict[str, list[str]] = {}
    self.added: dict[str, int] = {}  # added token -> id (>= len(vocab))
    self._added_by_form: dict[str, int] = {}  # normalized form of an added token -> its id
    self._added_re: re.Pattern | None = None

  @classmethod
  def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, **kw) -> CLIPTokenizer:
    """From ``vocab.json`` and ``merges.txt`` (a ``#version`` first line is skipped)."""
    with open(vocab_json, encoding='utf-8') as f:
      vocab = json.load(f)
    with open(merges_txt, encoding='utf-8') as f:
      lines = [ln.split() for ln in f.read().split('\n') if ln and not ln.startswith('#version')]
    return cls(vocab, [tuple(ln) for ln in lines if len(ln) == 2], **kw)

  @property
  def vocab_size(self) -> int:
    """The number of ids: the vocabulary and the added tokens (the rows a text encoder's table needs)."""
    return len(self.vocab) + len(self.added)

  @staticmethod
  def normalize(text: str) -> str:
    """CLIP's normalization: NFC, every run of whitespace to one space, lowercase."""
    return re.sub(r'\s+', ' ', unicodedata.normalize('NFC', text)).lower()

  def with_added_tokens(self, tokens: Sequence[str]) -> CLIPTokenizer:
    """A copy of this tokenizer with ``tokens`` added, each one id (``vocab_size``, ``vocab_size + 1``, ...).

    ValueError naming the token if one is empty or only whitespace, already in the vocabulary or
    added, or normalizes like another (so could never be matched). This tokenizer is unchanged.
    """
    new = copy.copy(self)
    new.added, new._added_by_form, new._cache = dict(self.added), dict(self._added_by_form), dict(self._cache)
    for token in tokens:
      if not isinstance(token, str) or not token.strip():
        raise ValueError(f'cannot add the token {token!r}: tokens are non-empty strings, not only whitespace')
      if token in self.vocab or token in new.added:
        raise ValueError(f'the token {token!r} is already in the tokenizer\'s vocabulary (id '
                         f'{self.vocab.get(token, new.added.get(token))}); choose another name')
      form = self.normalize(token)
      if form in new._added_by_form:
        other = next(t for t, i in new.added.items() if i == new._added_by_form[form])
        raise ValueError(f'the token {token!r} normalizes (lowercase, whitespace collapsed) to {form!r} like the '
                         f'added token {other!r}; prompts could not tell them apart')
      new.added[token] = new._added_by_form[form] = new.vocab_size
    # Longest alternatives first: re's alternation takes the first that matches at the leftmost position.
    forms = sorted(new._added_by_form, key=lambda f: (-len(f), f))
    new._added_re = re.compile('|'.join(map(re.escape, forms))) if forms else None
    return new

  def _bpe(self, word: str) -> list[str]:
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + '</w>']
    while len(parts) > 1:
      pairs = [(self.ranks.get(p, np.inf), i) for i, p in enumerate(zip(parts, parts[1:], strict=False))]
      rank, _ = min(pairs)
      if rank == np.inf:
        break
      pair = next(p for p in zip(parts, parts[1:], strict=False) if self.ranks.get(p) == rank)
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    self._cache[word] = parts
    return parts

  def _segments(self, text: str) -> list[tuple[str, bool]]:
    """Normalized ``text`` as (piece, is an added token) in order; the other pieces still to be BPE'd."""
    return _split_added(self._added_re, self.normalize(text))

  def _tokens(self, text: str) -> list[tuple[str, int]]:
    """(token, id) of every token of ``text`` (no bos/eos); an added token as its normalized text."""
    out = []
    for segment, is_added in self._segments(text):
      if is_added:
        out.append((segment, self._added_by_form[segment]))
        continue
      for piece in self.pattern.findall(segment):
        if piece in self.specials:
          out.append((piece, self.specials[piece]))
        else:
          out += [(t, self.vocab.get(t, self.unk_id)) for t in
                  self._bpe(''.join(self.byte_map[b] for b in piece.encode('utf-8')))]
    return out

  def tokenize(self, text: str) -> list[str]:
    """BPE tokens of ``text`` (no special tokens); an added token appears as matched (normalized), as in
    transformers."""
    return [t for t, _ in self._tokens(text)]

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without bos/eos."""
    return [i for _, i in self._tokens(text)]

  def __call__(self, texts: str | Sequence[str], max_length: int | None = -1, padding: bool = True) -> Tokens:
    """Ids (B, max_length) with bos/eos, truncated to ``max_length`` (default ``self.max_length``; None: no limit)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = self.max_length if max_length == -1 else max_length
    return _batch([_wrap(self.encode(t), self.bos_id, self.eos_id, n) for t in texts], n, self.pad_id, padding)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of ``ids``: bytes decoded, ``</w>`` read as a space."""
    inv = {v: k for k, v in self.vocab.items()}
    added = {v: k for k, v in self.added.items()}
    byte_inv = {c: b for b, c in self.byte_map.items()}
    special_ids = {self.bos_id, self.eos_id, self.pad_id}
    words, cur = [], []
    for i in map(int, ids):
      if i in special_ids:
        if not skip_special:
          words.append(bytes(cur).decode('utf-8', errors='replace') + inv[i])
          cur = []
        continue
      if i in added:  # a word of its own
        if cur:
          words.append(bytes(cur).decode('utf-8', errors='replace'))
          cur = []
        words.append(added[i])
        continue
      tok = inv[i]
      end = tok.endswith('</w>')
      cur += [byte_inv[c] for c in (tok[:-4] if end else tok)]
      if end:
        words.append(bytes(cur).decode('utf-8', errors='replace'))
        cur = []
    if cur:
      words.append(bytes(cur).decode('utf-8', errors='replace'))
    return ' '.join(words)


# -- T5 SentencePiece unigram ------------------------------------------------------------------------------------
class T5Tokenizer:
  """T5's tokenizer (SD3's third text encoder, Flux's and PixArt's only one).

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (from a ``tokenizer.json``: its normalizer, Metaspace
      pre-tokenizer and unigram model; its post-processor is not used, ``</s>`` is appended here).
    max_length: pad / truncate to this many ids including ``</s>`` (SD3: 256, Flux dev: 512).
  """

  def __init__(self, tokenizer, max_length: int = 256, eos_token: str = '</s>', pad_token: str = '<pad>'):
    self.tokenizer = tokenizer
    self.max_length = max_length
    ids = {t: tokenizer.token_to_id(t) for t in (eos_token, pad_token)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f'the T5 tokenizer has no {" or ".join(missing)} token')
    self.eos_id, self.pad_id = ids[eos_token], ids[pad_token]

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, max_length: int = 256) -> T5Tokenizer:
    """From a tokenizer folder's ``tokenizer.json`` (a diffusers pipeline's ``tokenizer_3/`` for SD3,
    ``tokenizer_2/`` for Flux)."""
    from tokenizers import Tokenizer
    path = os.path.join(os.fspath(folder), 'tokenizer.json')
    if not os.path.isfile(path):
      spiece = os.path.isfile(os.path.join(os.fspath(folder), 'spiece.model'))
      raise FileNotFoundError(f'{folder}: no tokenizer.json' + (
          ' (only spiece.model: write one with transformers, T5TokenizerFast.from_pretrained(folder)'
          '.save_pretrained(folder))' if spiece else ''))
    try:
      tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the library raises its own exception type for a malformed file
      raise ValueError(f'{path}: not a readable tokenizer.json ({e})') from e
    # A tokenizer.json that transformers saved after a call keeps that call's padding and truncation, which
    # ``encode`` would then apply (every prompt padded to that length): this class pads and truncates itself.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return cls(tokenizer, max_length)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without ``</s>``."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def __call__(self, texts: str | Sequence[str], max_length: int | None = -1, padding: bool = True) -> Tokens:
    """Ids (B, max_length) ending in ``</s>``, truncated to ``max_length`` (default ``self.max_length``; None: no
    limit), padded with ``<pad>`` (attention_mask 0)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = self.max_length if max_length == -1 else max_length
    bodies = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
    return _batch([_wrap(b, None, self.eos_id, n) for b in bodies], n, self.pad_id, padding)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


# -- BERT WordPiece -----------------------------------------------------------------------------------------------
def _is_punct(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith('P')


def _is_cjk(cp: int) -> bool:
  return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPieceTokenizer:
  """BERT tokenizer: basic tokenization (clean, CJK split, lowercase + strip accents, punctuation split)
  then greedy longest-match-first WordPiece (``##`` continuation prefix).

  Args:
    vocab: token -> id (``vocab.txt``, one token per line, id = line number).
    max_length: pad / truncate to this many ids including [CLS] and [SEP].
    lowercase: uncased model (also strips accents).
  """

  def __init__(self, vocab: dict[str, int], max_length: int = 128, lowercase: bool = True,
               unk_token: str = '[UNK]', cls_token: str = '[CLS]', sep_token: str = '[SEP]', pad_token: str = '[PAD]',
               max_chars_per_word: int = 100):
    self.vocab = dict(vocab)
    self.max_length = max_length
    self.lowercase = lowercase
    self.unk_token = unk_token
    self.cls_id, self.sep_id, self.pad_id = self.vocab[cls_token], self.vocab[sep_token], self.vocab[pad_token]
    self.specials = {unk_token, cls_token, sep_token, pad_token, '[MASK]'}
    self.max_chars_per_word = max_chars_per_word

  @classmethod
  def from_file(cls, vocab_txt: str | os.PathLike, **kw) -> WordPieceTokenizer:
    with open(vocab_txt, encoding='utf-8') as f:
      tokens = f.read().split('\n')
    if tokens and tokens[-1] == '':
      tokens.pop()
    return cls({t: i for i, t in enumerate(tokens)}, **kw)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _basic(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD:
        continue
      cat = unicodedata.category(ch)
      if ch in ' \t\n\r' or cat == 'Zs':
        chars.append(' ')
      elif cat.startswith('C'):
        continue
      elif _is_cjk(cp):
        chars.append(f' {ch} ')
      else:
        chars.append(ch)
    words = []
    for w in ''.join(chars).split():
      if w in self.specials:
        words.append(w)
        continue
      if self.lowercase:
        w = ''.join(c for c in unicodedata.normalize('NFD', w.lower()) if unicodedata.category(c) != 'Mn')
      cur = ''
      for c in w:
        if _is_punct(c):
          words += [cur, c] if cur else [c]
          cur = ''
        else:
          cur += c
      if cur:
        words.append(cur)
    return words

  def _wordpiece(self, word: str) -> list[str]:
    if len(word) > self.max_chars_per_word:
      return [self.unk_token]
    out, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = ('##' if start else '') + word[start:end]
        if piece in self.vocab:
          break
        end -= 1
      if end == start:
        return [self.unk_token]
      out.append(piece)
      start = end
    return out

  def tokenize(self, text: str) -> list[str]:
    return [p for w in self._basic(text) for p in (self._wordpiece(w) if w not in self.specials else [w])]

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without [CLS]/[SEP]."""
    unk = self.vocab[self.unk_token]
    return [self.vocab.get(t, unk) for t in self.tokenize(text)]

  def __call__(self, texts: str | Sequence[str], max_length: int | None = -1, padding: bool = True) -> Tokens:
    """[CLS] ids [SEP] (B, max_length), truncated to ``max_length`` (default ``self.max_length``)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = self.max_length if max_length == -1 else max_length
    return _batch([_wrap(self.encode(t), self.cls_id, self.sep_id, n) for t in texts], n, self.pad_id, padding)


class TakesAddedTokens(Protocol):
  """A tokenizer that takes added tokens (``CLIPTokenizer``, ``ByteTokenizer``): what textual inversion needs."""

  added: dict[str, int]  # added token -> id
  max_length: int

  @property
  def vocab(self) -> dict[str, int]: ...

  @property
  def vocab_size(self) -> int: ...

  def with_added_tokens(self, tokens: Sequence[str]) -> TakesAddedTokens: ...

  def tokenize(self, text: str) -> list[str]: ...

  def encode(self, text: str) -> list[int]: ...


# -- bytes ----------------------------------------------------------------------------------------------------------
class ByteTokenizer:
  """UTF-8 bytes as tokens: pad = 0, bos = 1, eos = 2, byte b = b + 3 (vocab_size 259). No file needed.

  Added tokens (``with_added_tokens``; textual inversion's placeholders) are whole strings with
  ids 259, 260, ... in the order added, found in a text (exact, longest first) before the rest
  is encoded byte by byte.
  """

  pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
  base_vocab_size = 259

  def __init__(self, max_length: int = 77):
    self.max_length = max_length
    self.added: dict[str, int] = {}
    self._added_re: re.Pattern | None = None

  @property
  def vocab_size(self) -> int:
    """The number of ids: 259 and the added tokens (the rows a text encoder's table needs)."""
    return self.base_vocab_size + len(self.added)

  @property
  def vocab(self) -> dict[str, int]:
    """Single characters of one UTF-8 byte (ASCII) and their ids: what an added token must not be."""
    return {chr(b): b + self.offset for b in range(128)}

  def with_added_tokens(self, tokens: Sequence[str]) -> ByteTokenizer:
    """A copy with ``tokens`` added (ids ``vocab_size``, ...); ValueError for an empty, one-character or repeated
    token. This tokenizer is unchanged."""
    new = copy.copy(self)
    new.added = dict(self.added)
    for token in tokens:
      if not isinstance(token, str) or len(token.encode('utf-8')) < 2:
        raise ValueError(f'cannot add the token {token!r}: an added token is a string of at least two bytes')
      if token in new.added:
        raise ValueError(f'the token {token!r} is already added (id {new.added[token]}); choose another name')
      new.added[token] = new.vocab_size
    forms = sorted(new.added, key=lambda t: (-len(t), t))
    new._added_re = re.compile('|'.join(map(re.escape, forms)))
    return new

  def _pieces(self, text: str) -> list[tuple[str, bool]]:
    return _split_added(self._added_re, text)

  def tokenize(self, text: str) -> list[str]:
    """The tokens of ``text``: added tokens whole, the rest character by character (a non-ASCII character is
    several byte tokens in ``encode``)."""
    return [t for piece, added in self._pieces(text) for t in ([piece] if added else list(piece))]

  def encode(self, text: str) -> list[int]:
    return [i for piece, added in self._pieces(text)
            for i in ([self.added[piece]] if added else [b + self.offset for b in piece.encode('utf-8')])]

  def __call__(self, texts: str | Sequence[str], max_length: int | None = -1, padding: bool = True) -> Tokens:
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = self.max_length if max_length == -1 else max_length
    return _batch([_wrap(self.encode(t), self.bos_id, self.eos_id, n) for t in texts], n, self.pad_id, padding)

  def decode(self, ids: Sequence[int]) -> str:
    names = {i: t for t, i in self.added.items()}
    out, run = [], []
    for i in (int(i) for i in ids):
      if i in names:
        out += [bytes(run).decode('utf-8', errors='replace'), names[i]]
        run = []
      elif self.offset <= i < self.base_vocab_size:
        run.append(i - self.offset)
    return ''.join(out) + bytes(run).decode('utf-8', errors='replace')
