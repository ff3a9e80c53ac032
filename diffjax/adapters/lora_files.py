"""LoRA files as people exchange them (diffusers / peft and kohya / A1111 safetensors) <-> diffjax adapters.

A file's layer is named by the reference module of the adapted kernel: ``convert.keys.torch_key``
of the kernel's path without ``.weight`` (CLIP text encoders under transformers' ``text_model.``
prefix, which files may also omit), or, for a U-Net, the original (ldm / sgm) name that
``convert.ldm.unet_ldm_renames`` gives (kohya's SDXL files), inverted. Tensors are PyTorch's:
``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r) or (out, r, 1, 1) (LoCon).

diffusers (``save_lora_weights`` / ``load_lora_weights``), keys ``<model>.<module>.<factor>`` with
<model> 'unet', 'text_encoder' or 'text_encoder_2' and <factor>
  * ``lora_A.weight`` / ``lora_B.weight`` (peft; what diffusers writes),
  * ``lora.down.weight`` / ``lora.up.weight`` (its older training scripts),
  * ``lora_linear_layer.down.weight`` / ``.up.weight`` (older text encoders),
  * ``[processor.]to_{q,k,v,out}_lora.{down,up}.weight`` (the first attention-processor files);
alpha comes from the optional ``lora_adapter_metadata`` JSON in the safetensors header: peft
``LoraConfig`` fields prefixed by model (``unet.lora_alpha``, ``unet.alpha_pattern`` ...), resolved
as peft does (a pattern p matches a module m when ``re.match(rf'(.*\\.)?({p})$', m)``; defaults
lora_alpha 8; ``use_rslora`` scales by alpha / sqrt(r)); without metadata alpha = rank.

kohya / A1111, keys ``<prefix><module with '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}``
with prefixes ``lora_unet_``, ``lora_te_`` (SD 1/2 text encoder), ``lora_te1_`` / ``lora_te2_``
(SDXL's two); ``alpha`` is a scalar tensor, absent meaning alpha = rank.

Keys that map to no layer (unknown modules, DoRA ``dora_scale`` / ``lora_magnitude_vector``, LoHa
``hada_``, LoKr ``lokr_``, full ``diff`` / ``diff_b`` weights, biases ...) are never skipped: reading
raises one ``WeightMismatchError`` naming the file and listing them all.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
import safetensors

from diffjax.adapters.lora import Adapters, Lora, kernels, merge
from diffjax.convert import ldm
from diffjax.convert.files import WeightFileError, read_safetensors, write_safetensors
from diffjax.convert.keys import WeightMismatchError, to_flax_array, to_torch_array, torch_key
from diffjax.models.unet import UNetConfig

FORMATS = ('diffusers', 'kohya')
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' entry in the safetensors header's __metadata__
KOHYA_PREFIXES = {'unet': ('lora_unet_',), 'text_encoder': ('lora_te_', 'lora_te1_'), 'text_encoder_2': ('lora_te2_',)}
CLIP_MODELS = ('text_encoder', 'text_encoder_2')
_CLIP_PREFIX = 'text_model.'  # transformers' CLIPTextModel module prefix (flattened away in transformers 5)

_DIFFUSERS_FACTORS = {'lora_A.weight': 'down', 'lora_B.weight': 'up', 'lora.down.weight': 'down',
                      'lora.up.weight': 'up', 'lora_linear_layer.down.weight': 'down',
                      'lora_linear_layer.up.weight': 'up'}
_KOHYA_FACTORS = {'lora_down.weight': 'down', 'lora_up.weight': 'up', 'alpha': 'alpha'}
# The attention-processor names: <attention>[.processor].to_q_lora.down.weight; U-Net vs CLIP projection names.
_PROCESSOR = re.compile(r'(?P<module>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<factor>down|up)'
                        r'\.weight')
_PROCESSOR_PROJ = {'unet': {'to_q': 'to_q', 'to_k': 'to_k', 'to_v': 'to_v', 'to_out': 'to_out.0'},
                   'clip': {'to_q': 'q_proj', 'to_k': 'k_proj', 'to_v': 'v_proj', 'to_out': 'out_proj'}}
_UNSUPPORTED = ((r'dora_scale|lora_magnitude_vector', 'DoRA'), (r'hada_', 'LoHa'), (r'lokr_', 'LoKr'),
                (r'\.diff(_b)?$', 'a full weight difference'), (r'lora_mid', "LoCon's Tucker factor"),
                (r'\.bias$', 'a bias'))


# -- names -------------------------------------------------------------------------------------------------------
def module_name(model: str, path: str) -> str:
  """The reference module name of the kernel at '/'-joined ``path`` of ``model`` (what files write)."""
  name = torch_key(tuple(path.split('/'))).removesuffix('.weight')
  return _CLIP_PREFIX + name if model in CLIP_MODELS and not name.startswith('text_projection') else name


def _unet_layout(unet: Mapping) -> UNetConfig | None:
  """The block layout of a U-Net parameter tree, what ``ldm.unet_ldm_renames`` reads; None if not a U-Net."""
  n = sum(1 for k in unet if re.fullmatch(r'down_blocks_\d+', k))
  if not n or 'mid_block' not in unet:
    return None
  down = [unet[f'down_blocks_{i}'] for i in range(n)]
  cls = unet.get('class_embedding', {})
  return UNetConfig(
      block_out_channels=tuple(d['resnets_0']['conv2']['kernel'].shape[-1] for d in down),
      layers_per_block=sum(1 for k in down[0] if k.startswith('resnets_')),
      attention_levels=tuple('attentions_0' in d for d in down),
      mid_block_attention='attentions_0' in unet['mid_block'],
      num_classes=1 if 'embedding' in cls else None, pooled_dim=1 if 'linear_1' in cls else None)


def ldm_namer(unet: Mapping) -> Callable[[str], str | None]:
  """diffusers module name -> original (ldm / sgm) name for the U-Net ``unet`` (None where it has none)."""
  layout = _unet_layout(unet)
  table = dict(ldm.unet_ldm_renames(layout)) if layout is not None else {}
  if 'add_embedding' in unet:  # SDXL's text_time MLP (sgm's label_emb)
    table |= {'label_emb.0.0': ('add_embedding.linear_1', None), 'label_emb.0.2': ('add_embedding.linear_2', None)}
  inverse = {new: (old, inner) for old, (new, inner) in table.items()}

  def to_ldm(name: str) -> str | None:
    parts = name.split('.')
    for n in range(len(parts), 0, -1):  # the longest known module prefix
      head = '.'.join(parts[:n])
      if head in inverse:
        old, inner = inverse[head]
        rest = '.'.join(parts[n:])
        for ldm_name, new in (inner or {}).items():
          if rest == new or rest.startswith(new + '.'):
            rest = ldm_name + rest[len(new):]
            break
        return f'{old}.{rest}' if rest else old
    return None

  return to_ldm


def _names(model: str, params: Mapping) -> dict[str, str]:
  """{every module name a file may use: kernel path} for one model."""
  to_ldm = ldm_namer(params) if model == 'unet' else None
  out = {}
  for path in kernels(params):
    name = module_name(model, path)
    aliases = [name, name.removeprefix(_CLIP_PREFIX)]
    if to_ldm is not None:
      aliases.append(to_ldm(name))
    for a in filter(None, aliases):
      if out.setdefault(a, path) != path:
        raise ValueError(f'{model}: module name {a} would name both {out[a]} and {path}')
  return out


def _kohya_names(tables: Mapping[str, Mapping[str, str]]) -> dict[str, tuple[str, str]]:
  """{kohya layer name (prefix + module with '_'): (model, kernel path)}."""
  out = {}
  for model, prefixes in KOHYA_PREFIXES.items():
    for name, path in tables.get(model, {}).items():
      for prefix in prefixes:
        key = prefix + name.replace('.', '_')
        if out.setdefault(key, (model, path)) != (model, path):  # '_' for '.' could in principle merge two names
          raise ValueError(f'kohya name {key} is ambiguous: {out[key]} and {(model, path)}')
  return out


# -- reading -------------------------------------------------------------------------------------------------------
def _peft_alpha(config: Mapping, module: str, rank: int) -> float:
  """A layer's alpha (for scale alpha / rank) under a peft ``LoraConfig`` dict, resolved as peft does."""
  alpha = config.get('lora_alpha', 8)  # peft's default
  for pattern, value in (config.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      alpha = value
      break
  return float(alpha) * (math.sqrt(rank) if config.get('use_rslora') else 1.0)  # rsLoRA: alpha / sqrt(r)


def _read_metadata(file: str) -> dict:
  with safetensors.safe_open(file, framework='numpy') as f:
    raw = (f.metadata() or {}).get(METADATA_KEY)
  if not raw:
    return {}
  try:
    meta = json.loads(raw)
  except ValueError as e:
    raise WeightFileError(f'{file}: the {METADATA_KEY} header entry is not valid JSON ({e})') from e
  if not isinstance(meta, dict):
    raise WeightFileError(f'{file}: the {METADATA_KEY} header entry is not a JSON object')
  return meta


def _diffusers_layer(key: str) -> tuple[str, str, str] | None:
  """(model, module name, factor) of a diffusers key, or None if it is none of the LoRA factor forms."""
  model, _, rest = key.partition('.')
  for suffix, factor in _DIFFUSERS_FACTORS.items():
    if rest.endswith('.' + suffix):
      return model, rest.removesuffix('.' + suffix), factor
  m = _PROCESSOR.fullmatch(rest)
  if m:
    proj = _PROCESSOR_PROJ['clip' if model in CLIP_MODELS else 'unet'][m['proj']]
    return model, f'{m["module"]}.{proj}', m['factor']
  return None


def _why_unmapped(key: str, given: Mapping) -> str:
  for pattern, what in _UNSUPPORTED:
    if re.search(pattern, key):
      return f'{what}, not supported'
  kohya = [m for m, prefixes in KOHYA_PREFIXES.items() if key.startswith(prefixes)]
  model = kohya[0] if kohya else key.partition('.')[0]
  if model in KOHYA_PREFIXES and model not in given:
    return f'no {model!r} parameters given'
  return 'no such layer in the models given' if model in given or kohya else 'not a LoRA key'


def read_lora(path: str | os.PathLike, params_by_model: Mapping[str, Mapping]) -> dict[str, Adapters]:
  """{model: adapters} of a diffusers or kohya LoRA ``.safetensors`` file (the formats in the module docstring).

  Args:
    path: the file.
    params_by_model: the parameter trees (arrays or ShapeDtypeStructs) of the models the file may
      adapt, by pipeline name: {'unet': ..., 'text_encoder': ..., 'text_encoder_2': ...} (a
      pipeline's params as they are: other entries such as 'vae' are ignored unless named).
  Returns:
    {model: {kernel path: Lora}} for each model the file adapts; factors float32 in diffjax layout.
  Raises:
    WeightMismatchError naming the file and listing every key that maps to no layer, every layer
    missing a factor and every factor that does not fit its kernel. WeightFileError: a malformed file.
  """
  file = os.fspath(path)
  state = read_safetensors(file)
  meta = _read_metadata(file)
  tables = {m: _names(m, p) for m, p in params_by_model.items()}
  shapes = {m: {k: tuple(w.shape) for k, w in kernels(p).items()} for m, p in params_by_model.items()}
  kohya = _kohya_names(tables)
  layers: dict[tuple[str, str], dict] = collections.defaultdict(dict)  # (model, path) -> {factor: (key, tensor)}
  modules, unmapped, bad = {}, [], []
  for key, w in state.items():
    stem, _, suffix = key.partition('.')
    if stem in kohya and suffix in _KOHYA_FACTORS:
      (model, kpath), factor, module = kohya[stem], _KOHYA_FACTORS[suffix], stem
    else:
      found = _diffusers_layer(key)
      if found is None or found[1] not in tables.get(found[0], {}):
        unmapped.append(f'{key} ({_why_unmapped(key, params_by_model)})')
        continue
      model, module, factor = found
      kpath = tables[model][module]
    entry = layers[model, kpath]
    if factor in entry:
      bad.append(f'{key}: a second {factor} factor for {model} {kpath} (first: {entry[factor][0]})')
    entry[factor] = (key, w)
    modules[model, kpath] = module
  out: dict[str, Adapters] = {}
  for (model, kpath), entry in sorted(layers.items()):
    if 'down' not in entry or 'up' not in entry:
      have = ', '.join(k for k, _ in entry.values())
      bad.append(f'{have}: no {"down" if "down" not in entry else "up"} factor for {model} {kpath}')
      continue
    factors = _factors(entry, shapes[model][kpath])
    if isinstance(factors, str):
      bad.append(f'{factors} ({model} {kpath})')
      continue
    down, up = factors
    alpha = _alpha(entry, meta, model, modules[model, kpath], up.shape[0])
    out.setdefault(model, {})[kpath] = Lora(jnp.asarray(down), jnp.asarray(up), alpha)
  if unmapped or bad:
    lines = [f'{file}: {len(unmapped)} LoRA keys map to no layer of the models given '
             f'({", ".join(params_by_model) or "none"}), {len(bad)} layers do not fit:']
    lines += [f'  {k}' for k in sorted(unmapped)] + [f'  {b}' for b in bad]
    raise WeightMismatchError('\n'.join(lines))
  return out


def _alpha(entry: Mapping, meta: Mapping, model: str, module: str, rank: int) -> float:
  if 'alpha' in entry:  # kohya's per-layer scalar
    return float(np.asarray(entry['alpha'][1], np.float64).reshape(-1)[0])
  config = {k.removeprefix(model + '.'): v for k, v in meta.items() if k.startswith(model + '.')}
  return _peft_alpha(config, module, rank) if config else float(rank)


def _factors(entry: Mapping, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | str:
  """(down, up) in diffjax layout, float32, from a layer's PyTorch factors for a kernel of ``shape``, or what is
  wrong with them."""
  (down_key, down), (up_key, up) = entry['down'], entry['up']
  rank = down.shape[0] if down.ndim in (2, 4) else -1
  d = to_flax_array(np.asarray(down, np.float32), (*shape[:-1], rank)) if rank > 0 else None
  u = to_flax_array(np.asarray(up, np.float32), (rank, shape[-1])) if up.ndim in (2, 4) and rank > 0 else None
  if d is None or u is None:
    return f'{down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} do not fit the kernel {shape}'
  return d, u


# -- writing -------------------------------------------------------------------------------------------------------
def _peft_config(layers: Mapping[str, tuple[int, float]]) -> dict:
  """A peft ``LoraConfig`` dict for {module: (rank, alpha)}: the most common rank and alpha, patterns for the rest."""
  r = collections.Counter(k for k, _ in layers.values()).most_common(1)[0][0]
  alpha = collections.Counter(a for _, a in layers.values()).most_common(1)[0][0]
  return {'r': r, 'lora_alpha': alpha, 'target_modules': sorted(layers),
          'rank_pattern': {re.escape(n): k for n, (k, _) in sorted(layers.items()) if k != r},
          'alpha_pattern': {re.escape(n): a for n, (_, a) in sorted(layers.items()) if a != alpha}}


def write_lora(path: str | os.PathLike, adapters_by_model: Mapping[str, Adapters], *, format: str = 'diffusers',
               kohya_unet_params: Mapping | None = None, dtype=np.float32) -> None:
  """Writes {model: adapters} as a LoRA ``.safetensors`` file that diffusers' ``load_lora_weights`` reads.

  Args:
    path: the file to write (atomically).
    adapters_by_model: {'unet' | 'text_encoder' | 'text_encoder_2': adapters}.
    format: 'diffusers': peft keys (``unet.<module>.lora_A.weight`` ...) and each model's rank and
      alpha as a peft ``LoraConfig`` in the ``lora_adapter_metadata`` header entry (what diffusers'
      training scripts write; module names there are without ``text_model.``, which transformers 5
      no longer has, and match either way). 'kohya': ``lora_unet_`` / ``lora_te_`` keys with a
      ``.alpha`` scalar per layer (``lora_te1_`` / ``lora_te2_`` when there is a 'text_encoder_2').
    kohya_unet_params: kohya format only: the U-Net's parameter tree (for its block layout) to name
      its layers by their original (sgm) names, as kohya's SDXL trainer does; None: diffusers names.
    dtype: of the factors in the file.
  """
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  tensors, metadata = {}, {}
  for model, adapters in adapters_by_model.items():
    if format == 'kohya' and model not in KOHYA_PREFIXES:
      raise ValueError(f'kohya files hold {", ".join(KOHYA_PREFIXES)} adapters; got {model!r}')
    if format == 'kohya':
      prefix = KOHYA_PREFIXES[model][-1 if 'text_encoder_2' in adapters_by_model else 0]  # lora_te1_ for SDXL
      to_ldm = ldm_namer(kohya_unet_params) if model == 'unet' and kohya_unet_params is not None else None
    layers = {}
    for kpath, lora in adapters.items():
      name = module_name(model, kpath)
      down = to_torch_array(('kernel',), np.asarray(lora.down, dtype))  # (r, in) or (r, in, kh, kw)
      up = to_torch_array(('kernel',), np.asarray(lora.up, dtype))  # (out, r)
      if down.ndim == 4:
        up = up[:, :, None, None]  # LoCon's up is a 1x1 convolution
      if format == 'kohya':
        ldm_name = to_ldm(name) if to_ldm else name
        if ldm_name is None:
          raise ValueError(f'{model} {kpath}: no original (sgm) U-Net name for {name}')
        stem = prefix + ldm_name.replace('.', '_')
        tensors |= {f'{stem}.lora_down.weight': down, f'{stem}.lora_up.weight': up,
                    f'{stem}.alpha': np.asarray(lora.alpha, np.float32)}
      else:
        tensors |= {f'{model}.{name}.lora_A.weight': down, f'{model}.{name}.lora_B.weight': up}
        layers[name.removeprefix(_CLIP_PREFIX)] = (lora.rank, lora.alpha)
    if layers:
      metadata |= {f'{model}.{k}': v for k, v in _peft_config(layers).items()}
  header = {'format': 'pt'} | ({METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)} if metadata else {})
  write_safetensors(path, tensors, header)


# -- pipelines -----------------------------------------------------------------------------------------------------
def merge_lora_files(params: Mapping[str, Mapping], *files: str | os.PathLike | tuple[str | os.PathLike, float]
                     ) -> dict:
  """A pipeline's params ({'unet', 'vae', 'text_encoder', ...}, as ``pipelines.from_pretrained`` returns them)
  with the LoRA files merged in: each argument is a path (scale 1) or a ``(path, scale)`` pair.

  ``pipe, params = pipelines.from_pretrained(folder); params = merge_lora_files(params, 'lora.safetensors')``;
  the models no file adapts are passed through as they are (the same arrays).
  """
  weighted: dict[str, list] = collections.defaultdict(list)
  for f in files:
    file, scale = (f, 1.0) if isinstance(f, str | os.PathLike) else f
    for model, adapters in read_lora(file, params).items():
      weighted[model].append((adapters, scale))
  return {**params, **{m: merge(params[m], *pairs) for m, pairs in weighted.items()}}
