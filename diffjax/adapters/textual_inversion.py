"""Textual inversion (Gal et al. 2023) as files, tokenizer tokens and rows of the text encoders' token tables.

A learned concept is a placeholder token (``'<cat-toy>'``) with n >= 1 vectors per text encoder,
an ``Embedding``. Nothing in the model changes: each vector gets a token of its own, with an id
after the vocabulary (``CLIPTokenizer.with_added_tokens``), and the encoder's token table
``text_params['embeddings']['token_embedding']['embedding']`` (V, D) gets the vectors appended as
rows (``extend_embeddings``): (V + n, D), row V + i for the i-th new token. As in diffusers, n > 1
vectors are the tokens ``tok, tok_1, ..., tok_{n-1}`` (``vector_tokens``) and a prompt's ``tok`` is
rewritten to all of them before tokenizing (``expand_prompt``, diffusers' ``maybe_convert_prompt``);
a pipeline that tokenizes an unexpanded prompt sees only the first vector. Flax checks a table's
shape against the module's config, so the encoder that applies extended params needs
``vocab_size = V + n``: ``module.clone(config=fit_config(module.config, text_params))``.

Files (``read_embedding`` / ``write_embedding``) are safetensors, or a dict the caller loaded
(numpy or torch tensors), in the forms diffusers' ``load_textual_inversion`` reads:
  * diffusers: ``{token: (D,) or (n, D)}``, exactly one entry (what its training script writes);
  * A1111: ``{'string_to_param': {'*': (n, D)}, 'name': token, ...}`` (the dict in a ``.pt``), and
    in safetensors ``{'emb_params': (n, D)}``, whose token is the file's stem, A1111's rule (diffusers
    would name the token 'emb_params');
  * SDXL: ``{'clip_l': (n, 768), 'clip_g': (n, 1280)}`` for ``text_encoder`` and ``text_encoder_2``; no
    token inside, so ``token=`` or the file's stem (diffusers loads each tensor into its encoder with
    ``load_textual_inversion(state['clip_l'], token=..., text_encoder=..., tokenizer=...)``).
``token=`` overrides a file's own name, as in diffusers. ``write_embedding`` writes the diffusers
form (one encoder) or the SDXL form (two).

Text params are trees as pipelines hold them (``params['text_encoder']``; a table boxed with
logical axis names stays boxed); everything here is a pure function of them. A training job updates the new rows alone::

  vectors = initial_vectors(tokenizer, params['text_encoder'], 'toy', n)   # (n, D), a word's row
  (tokenizer,), (text,) = add_embedding(Embedding('<toy>', (vectors,)), [tokenizer], [params['text_encoder']])
  encoder = text_module.clone(config=fit_config(text_module.config, text))
  base, rows = split_embeddings(text, n)                                  # frozen (V, D) table, rows (n, D)

  def loss_fn(rows, batch):                                               # ids from expand_prompt + tokenizer
    context = encoder.apply({'params': extend_embeddings(base, rows)}, batch['ids']).last_hidden_state
    ...
  grads = jax.grad(loss_fn)(rows, batch)                                  # (n, D): only the new rows
  write_embedding('learned_embeds.safetensors', Embedding('<toy>', (rows,)))

(SDXL: one ``(base, rows)`` pair per encoder, ``Embedding('<toy>', (rows_l, rows_g))``.) The base
table is not an argument of the loss, so it gets no gradient and needs no optimizer state, and
diffusers' restoring of the other rows after each step is unnecessary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert.files import PICKLE_SUFFIXES, PickleRefusedError, read_safetensors, write_safetensors
from diffjax.models.tokenizers import TakesAddedTokens

TABLE = ('embeddings', 'token_embedding', 'embedding')  # the token table's path in CLIP text params
ENCODERS = ('text_encoder', 'text_encoder_2')  # the pipelines' names, in the order of ``Embedding.vectors``
SDXL_KEYS = ('clip_l', 'clip_g')  # SDXL files: the vectors of text_encoder, text_encoder_2
A1111_KEY = 'emb_params'  # A1111's safetensors embeddings


def _encoder_names(n: int) -> list[str]:
  """The pipelines' names of n text encoders: text_encoder, text_encoder_2, ..."""
  return [ENCODERS[0]] + [f'text_encoder_{i + 1}' for i in range(1, n)]


def vector_tokens(token: str, n: int) -> list[str]:
  """The tokens of an n-vector embedding: ``[token, token_1, ..., token_{n-1}]`` (diffusers' names)."""
  return [token] + [f'{token}_{i}' for i in range(1, n)]


@dataclasses.dataclass(frozen=True)
class Embedding:
  """A learned concept.

  Attributes:
    token: the placeholder as written in prompts.
    vectors: one float32 array (n, D_i) per text encoder, in ``ENCODERS`` order: (text_encoder,) for
      SD 1.x / 2.x, (text_encoder, text_encoder_2) = (clip_l, clip_g) for SDXL; the same n for all.
    source: where it came from (the file), for error messages.
  """

  token: str
  vectors: tuple[np.ndarray, ...]
  source: str = 'embedding'

  def __post_init__(self):
    where = f'{self.source}: token {self.token!r}'
    if not isinstance(self.token, str) or not self.token.strip():
      raise ValueError(f'{self.source}: the token must be a non-empty string, got {self.token!r}')
    if hasattr(self.vectors, 'shape'):  # one array, not one per encoder: its rows would pass for encoders
      raise ValueError(f'{where}: vectors must be a tuple with one (n, D) array per text encoder; wrap the '
                       f'array: (vectors,)')
    vectors = tuple(_vectors(v, where) for v in self.vectors)
    if not vectors or len({v.shape[0] for v in vectors}) != 1:
      raise ValueError(f'{where}: need vectors for at least one encoder, all with the same number of vectors; '
                       f'got shapes {[v.shape for v in vectors]}')
    object.__setattr__(self, 'vectors', vectors)

  @property
  def num_vectors(self) -> int:
    return self.vectors[0].shape[0]

  @property
  def tokens(self) -> list[str]:
    """The tokens the vectors get: ``vector_tokens(token, num_vectors)``."""
    return vector_tokens(self.token, self.num_vectors)


def _vectors(x: Any, where: str) -> np.ndarray:
  """A file's tensor (numpy or torch; (D,) or (n, D)) as float32 (n, D)."""
  if hasattr(x, 'detach'):  # a torch tensor (A1111's are Parameters that require grad)
    x = x.detach().cpu()
    x = x.float() if str(x.dtype) in ('torch.bfloat16', 'torch.float16') else x
    x = x.numpy()
  a = np.asarray(x)
  if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == 'bfloat16'):
    raise ValueError(f'{where}: the vectors have dtype {a.dtype}, not a float type')
  a = a.astype(np.float32)
  if a.ndim == 1:
    a = a[None]
  if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
    raise ValueError(f'{where}: the vectors have shape {a.shape}; expected (D,) or (n, D)')
  return a


# -- files ------------------------------------------------------------------------------------------------------------
def _load(path: str, allow_pickle: bool) -> Mapping:
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if not path.endswith(PICKLE_SUFFIXES):
    raise ValueError(f'{path}: unknown embedding file type; expected .safetensors, or with allow_pickle=True '
                     f'{", ".join(PICKLE_SUFFIXES)}')
  if not allow_pickle:
    raise PickleRefusedError(f'{path} is a pickled PyTorch file; loading it can execute code. Pass '
                             f'allow_pickle=True if you trust its source')
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'reading the pickled embedding {path} needs PyTorch (pip install torch)') from e
  return torch.load(path, map_location='cpu', weights_only=True)


def _parse(state: Mapping, token: str | None, source: str, stem: str | None) -> Embedding:
  """The ``Embedding`` of a loaded file's dict (see the module docstring for the forms)."""
  if not isinstance(state, Mapping):  # a pickled bare tensor: diffusers needs token= for it too
    if token is None or not hasattr(state, 'shape'):
      raise ValueError(f'{source}: holds a {type(state).__name__}, not a dict of tensors' +
                       ('; pass token=... to name a bare tensor' if hasattr(state, 'shape') else ''))
    return Embedding(token, (state,), source)
  keys = set(state)
  if keys == set(SDXL_KEYS):
    name, vectors = token or stem, tuple(state[k] for k in SDXL_KEYS)
  elif keys == {A1111_KEY}:
    name, vectors = token or stem, (state[A1111_KEY],)
  elif 'string_to_param' in keys:  # A1111's .pt (before the one-entry form: its dict may hold nothing else)
    params = state['string_to_param']
    if not isinstance(params, Mapping) or '*' not in params:
      raise ValueError(f"{source}: 'string_to_param' must be a dict with the key '*' (A1111's embedding), got "
                       f'{type(params).__name__}' + (f' with keys {sorted(params)}' if isinstance(params, Mapping)
                                                     else ''))
    name, vectors = token or state.get('name'), (params['*'],)
  elif len(keys) == 1:  # diffusers
    (key, value), = state.items()
    name, vectors = token or key, (value,)
  else:
    raise ValueError(f'{source}: not a textual inversion embedding: keys {sorted(keys)[:8]}; expected one entry '
                     f"{{token: (n, D)}} (diffusers), {{'string_to_param': {{'*': (n, D)}}, 'name': ...}} or "
                     f"{{'{A1111_KEY}': (n, D)}} (A1111), or {{'clip_l', 'clip_g'}} (SDXL)")
  if not isinstance(name, str) or not name:
    raise ValueError(f'{source}: the embedding names no token; pass token=...')
  return Embedding(name, vectors, source)


def read_embedding(source: str | os.PathLike | Mapping, token: str | None = None, *,
                   allow_pickle: bool = False) -> Embedding:
  """The ``Embedding`` in a textual inversion file or an already loaded dict.

  Args:
    source: a ``.safetensors`` file (or, with ``allow_pickle``, a ``.bin`` / ``.pt``, read with
      ``torch.load(weights_only=True)``), or a dict of numpy / torch tensors in one of the forms of
      the module docstring.
    token: the placeholder to use instead of the file's (needed for an SDXL or ``emb_params`` dict,
      whose token is otherwise the file's stem).

  ValueError (naming the file) for a dict in no known form, vectors that are not (D,) / (n, D)
  floats, or SDXL vectors with different n; ``WeightFileError`` for a malformed safetensors file.
  """
  if isinstance(source, Mapping):
    return _parse(source, token, '<dict>', None)
  path = os.fspath(source)
  stem = os.path.splitext(os.path.basename(path))[0]
  return _parse(_load(path, allow_pickle), token, path, stem)


def write_embedding(path: str | os.PathLike, embedding: Embedding) -> None:
  """Writes ``embedding`` as safetensors (float32) that diffusers loads: ``{token: (n, D)}`` for one encoder,
  ``{'clip_l': (n, D1), 'clip_g': (n, D2)}`` (no token) for SDXL's two."""
  p = os.fspath(path)
  if not p.endswith('.safetensors'):
    raise ValueError(f'{p}: textual inversion files are written as .safetensors (diffusers reads other names '
                     f'with torch.load)')
  vectors = embedding.vectors
  if len(vectors) == 1:
    tensors = {embedding.token: vectors[0]}
  elif len(vectors) == len(SDXL_KEYS):
    tensors = dict(zip(SDXL_KEYS, vectors, strict=True))
  else:
    raise ValueError(f'{p}: an embedding for {len(vectors)} text encoders has no file form (1: diffusers, 2: SDXL)')
  write_safetensors(p, {k: np.asarray(v, np.float32) for k, v in tensors.items()})


# -- prompts ----------------------------------------------------------------------------------------------------------
def _expand(tokenizer: TakesAddedTokens, prompt: str) -> str:
  # diffusers' _maybe_convert_prompt: a plain substring replacement of each added token seen in the prompt (as
  # tokenized: normalized) that has ``_1`` companions. diffusers visits the tokens in set order; first-seen order
  # here gives the same prompt except for contrived overlaps of tokens.
  for tok in dict.fromkeys(tokenizer.tokenize(prompt)):
    if tok in tokenizer.added:
      replacement, i = tok, 1
      while f'{tok}_{i}' in tokenizer.added:
        replacement += f' {tok}_{i}'
        i += 1
      prompt = prompt.replace(tok, replacement)
  return prompt


def expand_prompt(tokenizer: TakesAddedTokens, prompt: str | Sequence[str]) -> str | list[str]:
  """``prompt`` (or each of a list) with every multi-vector token ``tok`` written as ``tok tok_1 ... tok_{n-1}``,
  exactly as diffusers' ``maybe_convert_prompt``; tokenize the result. Single-vector and unknown tokens are kept."""
  if isinstance(prompt, str):
    return _expand(tokenizer, prompt)
  return [_expand(tokenizer, p) for p in prompt]


# -- parameter trees --------------------------------------------------------------------------------------------------
def _leaf(text_params: Mapping):
  """The token table's leaf (an array, or one boxed with logical axis names); ValueError if there is none."""
  node = text_params
  for k in TABLE:
    if not isinstance(node, Mapping) or k not in node:
      keys = sorted(text_params) if isinstance(text_params, Mapping) else type(text_params).__name__
      raise ValueError(f"not CLIP text encoder params: no token table at {'/'.join(TABLE)} (top-level keys "
                       f"{keys}); pass one encoder's params, e.g. params['text_encoder']")
    node = node[k]
  return node


def token_table(text_params: Mapping) -> jax.Array:
  """The token-embedding table (V, D) of CLIP text params (at ``TABLE``); ValueError if there is none."""
  return nn.meta.unbox(_leaf(text_params))


def _with_table(text_params: Mapping, table: jax.Array) -> dict:
  """``text_params`` with the token table replaced (kept in its box, if it has one)."""
  leaf = _leaf(text_params)
  table = leaf.replace_boxed(table) if isinstance(leaf, nn.meta.AxisMetadata) else table
  emb = text_params[TABLE[0]]
  return {**text_params, TABLE[0]: {**emb, TABLE[1]: {**emb[TABLE[1]], TABLE[2]: table}}}


def extend_embeddings(text_params: Mapping, new_vectors: jax.Array) -> dict:
  """``text_params`` with ``new_vectors`` (n, D) appended to the token table: (V, D) -> (V + n, D).

  Pure and differentiable in ``new_vectors`` (cast to the table's dtype); the join of
  ``split_embeddings``. The encoder applying the result needs ``fit_config``'s ``vocab_size``.
  """
  table = token_table(text_params)
  rows = jnp.asarray(new_vectors)
  if rows.ndim != 2 or rows.shape[1] != table.shape[1]:
    raise ValueError(f'new vectors of shape {tuple(rows.shape)} do not extend a token table {tuple(table.shape)}: '
                     f'need (n, {table.shape[1]})')
  return _with_table(text_params, jnp.concatenate([table, rows.astype(table.dtype)], axis=0))


def split_embeddings(text_params: Mapping, num_new: int) -> tuple[dict, jax.Array]:
  """(base params with the table's first V rows, the last ``num_new`` rows (n, D)): the inverse of
  ``extend_embeddings``. Train the rows against the frozen base with ``extend_embeddings(base, rows)``."""
  table = token_table(text_params)
  if not 1 <= num_new < table.shape[0]:
    raise ValueError(f'cannot split {num_new} new rows off a token table of {table.shape[0]} rows')
  return _with_table(text_params, table[:-num_new]), table[-num_new:]


def fit_config(config, text_params: Mapping):
  """``config`` (a ``CLIPTextConfig``) with ``vocab_size`` = the rows of ``text_params``' token table, so that
  ``CLIPTextTransformer(fit_config(config, params)).apply({'params': params}, ...)`` accepts extended params."""
  return dataclasses.replace(config, vocab_size=int(token_table(text_params).shape[0]))


def initial_vectors(tokenizer: TakesAddedTokens, text_params: Mapping, word: str, num_vectors: int = 1, *,
                    several_tokens: bool = False) -> np.ndarray:
  """(num_vectors, D) float32 copies of ``word``'s row, the start of training (diffusers' ``initializer_token``);
  ValueError unless ``word`` is one token, or with ``several_tokens`` the mean of its tokens' rows (a byte
  tokenizer's word is several tokens)."""
  ids = tokenizer.encode(word)
  if not ids or (len(ids) != 1 and not several_tokens):
    raise ValueError(f'the initializer {word!r} is {len(ids)} tokens {tokenizer.tokenize(word)}; it must be one')
  row = np.asarray(token_table(text_params)[np.asarray(ids)], np.float32).mean(axis=0)
  return np.repeat(row[None], num_vectors, axis=0)


# -- tokenizers and params together -----------------------------------------------------------------------------------
def _check_fit(embedding: Embedding, tokenizers: Sequence[TakesAddedTokens], text_params: Sequence[Mapping]) -> None:
  """ValueError unless ``embedding`` can be added to these encoders (count, widths, ids, free tokens)."""
  src, token, n = embedding.source, embedding.token, len(text_params)
  if len(tokenizers) != n:
    raise ValueError(f'{len(tokenizers)} tokenizers for {n} text encoders; pass one tokenizer per encoder')
  have = len(embedding.vectors)
  if have == 2 and n == 1:
    raise ValueError(f'{src}: an SDXL embedding (clip_l and clip_g vectors for two text encoders) but the pipeline '
                     f'has one text encoder; load it into an SDXL pipeline (text_encoder and text_encoder_2)')
  if have != n:
    raise ValueError(f'{src}: an embedding for {have} text encoder(s) (width {embedding.vectors[0].shape[1]}) but '
                     f'the pipeline has {n}' + (" (SDXL needs a file with 'clip_l' and 'clip_g' vectors)"
                                                if n == 2 else ''))
  for name, tok, params, vectors in zip(_encoder_names(n), tokenizers, text_params, embedding.vectors, strict=True):
    table = token_table(params)
    if vectors.shape[1] != table.shape[1]:
      raise ValueError(f'{src}: token {token!r} has vectors of width {vectors.shape[1]} but {name} expects '
                       f'D = {table.shape[1]} (its token table is {tuple(table.shape)}); the embedding was '
                       f'trained for another text encoder')
    if tok.vocab_size != table.shape[0]:
      raise ValueError(f"{name}: the tokenizer has {tok.vocab_size} ids but the token table has {table.shape[0]} "
                       f"rows; new tokens' ids would not be their rows")
    taken = [t for t in embedding.tokens if t in tok.vocab or t in tok.added]
    if taken:
      raise ValueError(f"{src}: token {taken[0]!r} is already in {name}'s tokenizer vocabulary; pass token=... "
                       f'to load the embedding under another name')


def add_embedding(embedding: Embedding, tokenizers: Sequence[TakesAddedTokens], text_params: Sequence[Mapping]
                  ) -> tuple[list[TakesAddedTokens], list[dict]]:
  """(tokenizers, text params) with ``embedding``'s tokens added and its vectors appended, per text encoder.

  ``tokenizers`` and ``text_params`` hold one entry per text encoder, in ``ENCODERS`` order (SD: 1;
  SDXL: 2, e.g. ``[params['text_encoder'], params['text_encoder_2']]``). Each tokenizer gets
  ``embedding.tokens`` with ids V, ..., V + n - 1 and each table those rows (V = the table's rows,
  which must equal the tokenizer's ``vocab_size``). The inputs are unchanged.

  ValueError (naming the file) for an SDXL embedding and one encoder or a one-encoder embedding and
  two, vectors of the wrong width (naming the token and the expected D), a token already in a
  tokenizer's vocabulary (including a multi-vector ``tok_1``), or a table / tokenizer size mismatch.
  """
  _check_fit(embedding, tokenizers, text_params)
  new_tokenizers = [tok.with_added_tokens(embedding.tokens) for tok in tokenizers]
  new_params = [extend_embeddings(p, v) for p, v in zip(text_params, embedding.vectors, strict=True)]
  return new_tokenizers, new_params


def load_textual_inversion(source: str | os.PathLike | Mapping, tokenizers: Sequence[TakesAddedTokens],
                           text_params: Sequence[Mapping], *, token: str | None = None, allow_pickle: bool = False
                           ) -> tuple[list[TakesAddedTokens], list[dict]]:
  """``add_embedding(read_embedding(source, token), tokenizers, text_params)``: diffusers'
  ``load_textual_inversion`` for one file, as new tokenizers and params."""
  return add_embedding(read_embedding(source, token, allow_pickle=allow_pickle), tokenizers, text_params)


def extract_embedding(token: str, tokenizers: Sequence[TakesAddedTokens], text_params: Sequence[Mapping]
                      ) -> Embedding:
  """The ``Embedding`` of an added ``token``: the rows of ``token``, ``token_1``, ... in each encoder's table
  (the inverse of ``add_embedding``; write it with ``write_embedding``)."""
  if len(tokenizers) != len(text_params):
    raise ValueError(f'{len(tokenizers)} tokenizers for {len(text_params)} text encoders')
  vectors = []
  for name, tok, params in zip(_encoder_names(len(text_params)), tokenizers, text_params, strict=True):
    if token not in tok.added:
      raise ValueError(f"{token!r} is not an added token of {name}'s tokenizer (added: {sorted(tok.added)[:8]})")
    names = [token]
    while f'{token}_{len(names)}' in tok.added:
      names.append(f'{token}_{len(names)}')
    table = token_table(params)
    vectors.append(np.asarray(table[np.array([tok.added[t] for t in names])], np.float32))
  return Embedding(token, tuple(vectors), 'extracted')
