"""Compiled pipeline programs kept on disk: a warm start that neither traces nor lowers.

JAX's persistent compilation cache skips XLA's compilation, but it must trace and lower a
program to find its key (for SD 1.5's txt2img at 256 px, 1.7 s of the 4.3 s a second
process spent before its first image). A pipeline built from files carries a
``fingerprint`` of everything that decides its programs besides the parameters' shapes (the
modules' configurations, the scheduler, the loader's options; ``fingerprint``); with the
fingerprint of diffjax's source, the library versions, XLA's flags, JAX's configuration,
the task's static options and the shapes, dtypes and shardings of the arguments, it names
a serialized executable (``jax.experimental.serialize_executable``) that a ``Program``
loads instead of tracing.

The executables live in ``diffjax-programs/<environment>/`` inside JAX's persistent cache
folder (``jax_compilation_cache_dir``) and are used whenever that cache is on, unless the
environment sets ``DIFFJAX_STORED_PROGRAMS=0`` (``ENABLE``). They are compiled without JAX's
cache (an executable loaded from it does not serialize whole). Only single-device programs
are stored (sharded calls run through ``jax.jit`` as usual), and only for pipelines with a
fingerprint. Like JAX's own cache, the files are pickles: keep
the folder private. An unreadable file is logged, recompiled and replaced.

Deserializing SD 1.5's txt2img program takes about a second (XLA rebuilds its HLO module and
thunks); ``preload``, which the pipeline loaders call first, can start that for the most recently
used programs in a background thread, so that it overlaps with reading the weights (1.3-1.6 s off a
warm start). It is off unless the environment sets ``DIFFJAX_READ_AHEAD=1`` (``READ_AHEAD``): in
one clean-clone test run a later XLA compilation in the same process crashed (segmentation fault)
after read-aheads had run beside the loader's own small compilations; until that is understood the
read-ahead stays opt-in, and a compilation never starts while one is in flight.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import pickle
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from diffjax.convert.files import write_atomically

FORMAT = 2  # bump when the file layout changes
FOLDER = "diffjax-programs"
ENABLE = "DIFFJAX_STORED_PROGRAMS"
PRELOAD = 4  # how many of the most recently used programs ``preload`` deserializes ahead
READ_AHEAD = "DIFFJAX_READ_AHEAD"  # "1": the loaders read stored programs ahead (module docstring)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # diffjax/


def _canonical(obj):
  """A JSON-able, deterministic description of ``obj``; TypeError for what has none (a lambda, an object)."""
  if obj is None or isinstance(obj, bool | int | float | str):
    return obj
  if isinstance(obj, np.ndarray | jax.Array | np.generic):
    a = np.asarray(obj)
    return {"array": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(), "shape": a.shape,
            "dtype": str(a.dtype)}
  if isinstance(obj, np.dtype):
    return {"dtype": str(obj)}
  if isinstance(obj, type):  # jnp.float32 and the like by their dtype, other classes by name
    try:
      return {"dtype": str(np.dtype(obj))}
    except TypeError:
      return {"type": f"{obj.__module__}.{obj.__qualname__}"}
  if dataclasses.is_dataclass(obj):  # also flax modules: their fields, not their scope
    fields = {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)
              if f.name not in ("parent", "name")}
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "fields": fields}
  if isinstance(obj, dict):
    return {"dict": sorted([[_canonical(k), _canonical(v)] for k, v in obj.items()], key=json.dumps)}
  if isinstance(obj, list | tuple):
    return [_canonical(v) for v in obj]
  if isinstance(obj, functools.partial):
    return {"partial": [_canonical(obj.func), _canonical(obj.args), _canonical(obj.keywords)]}
  if callable(obj) and "<" not in getattr(obj, "__qualname__", "<"):  # a named module-level function
    return {"function": f"{obj.__module__}.{obj.__qualname__}"}
  raise TypeError(f"cannot fingerprint a {type(obj).__name__}: {obj!r:.80}")


def fingerprint(*parts) -> str:
  """SHA-256 of a deterministic description of ``parts`` (dataclasses such as module configs, flax modules'
  fields, arrays by their bytes, dtypes, containers, numbers and strings)."""
  text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def environment() -> str:
  """SHA-256 of what decides a compiled program besides its inputs: diffjax's source, jax/jaxlib/flax/numpy
  versions, ``XLA_FLAGS``, JAX's configuration and the backend."""
  h = hashlib.sha256()
  for folder, dirs, names in os.walk(_PACKAGE):
    dirs.sort()
    for name in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, _PACKAGE).encode())
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "numpy")}
  device = jax.devices()[0]
  config = {k: v for k, v in jax.config.values.items() if "compilation_cache" not in k and "persistent_cache" not in k}
  rest = {"versions": versions, "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": config,
          "backend": [device.platform, device.client.platform_version, device.device_kind]}
  h.update(json.dumps(rest, sort_keys=True, default=str).encode())
  return h.hexdigest()


def _folder() -> str | None:
  """Where programs are stored: a folder per ``environment`` in JAX's persistent cache folder, unless
  ``DIFFJAX_STORED_PROGRAMS=0``."""
  root = jax.config.values.get("jax_compilation_cache_dir")
  if os.environ.get(ENABLE) == "0" or not root or not jax.config.values["jax_enable_compilation_cache"]:
    return None
  return os.path.join(os.path.expanduser(root), FOLDER, environment())


def _read(path: str) -> jax.stages.Compiled:
  """The executable stored in ``path``, loaded onto the first device."""
  with open(path, "rb") as f:
    payload, in_tree, out_tree = pickle.load(f)
  return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=jax.devices()[:1])


def _mark_used(path: str) -> None:
  """Sets the file's modification time to now: ``preload`` picks programs by it."""
  try:
    os.utime(path)
  except OSError:  # a read-only cache still serves
    pass


# Programs being read ahead by ``preload``, by path; a Program takes its entry out when it first needs that path.
_preloaded: dict[str, concurrent.futures.Future] = {}
_reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffjax-programs")


def preload(limit: int = PRELOAD) -> int:
  """Starts reading the ``limit`` most recently used stored programs in a background thread; returns how many.

  XLA's deserialization releases the GIL, so this overlaps with whatever the caller does next (the pipeline
  loaders call it before reading weights). Nothing happens unless ``DIFFJAX_READ_AHEAD=1`` or when programs
  are not stored (``_folder``). A program read ahead but never asked for only costs its memory.
  """
  folder = _folder()
  if os.environ.get(READ_AHEAD) != "1" or folder is None or limit <= 0 or not os.path.isdir(folder):
    return 0
  entries = [e for e in os.scandir(folder) if e.name.endswith(".pkl") and e.is_file()]
  recent = sorted(entries, key=lambda e: e.stat().st_mtime, reverse=True)[:limit]
  for entry in recent:
    if entry.path not in _preloaded:
      _preloaded[entry.path] = _reader.submit(_read, entry.path)
  return len(recent)


def _one_device(leaves) -> bool:
  first = jax.devices()[0]
  return all(not isinstance(x, jax.Array) or x.sharding.device_set == {first} for x in leaves)


def _signature(treedef, leaves) -> tuple:
  """Shapes, dtypes, weak types and shardings of the flattened arguments, with their tree structure."""
  return (str(treedef),) + tuple((str(jax.typeof(x)), str(getattr(x, "sharding", None))) for x in leaves)


class Program:
  """``jax.jit(fn)``, whose executables are also stored on disk under ``key`` + the arguments' signature.

  Args:
    fn: the pure function (its static options bound, e.g. by ``functools.partial``).
    key: a fingerprint (``fingerprint``) of the pipeline and of ``fn``'s static options; None: never stored
      (plain ``jax.jit``).
  """

  def __init__(self, fn: Callable, key: str | None):
    self._jit = jax.jit(fn)
    self._key = key
    self._loaded: dict[tuple, jax.stages.Compiled] = {}  # by the arguments' signature

  def __call__(self, *args, **kwargs):
    folder = _folder()
    leaves, treedef = jax.tree.flatten((args, kwargs))
    if self._key is None or folder is None or not _one_device(leaves):
      return self._jit(*args, **kwargs)
    signature = _signature(treedef, leaves)
    if signature not in self._loaded:
      name = fingerprint(FORMAT, self._key, signature)  # the folder names the environment
      self._loaded[signature] = self._load_or_compile(os.path.join(folder, name + ".pkl"), args, kwargs)
    return self._loaded[signature](*args, **kwargs)

  def _load_or_compile(self, path: str, args, kwargs) -> jax.stages.Compiled:
    ahead = _preloaded.pop(path, None)
    if ahead is not None or os.path.isfile(path):
      try:
        compiled = ahead.result() if ahead is not None else _read(path)
        _mark_used(path)
        return compiled
      except Exception as e:  # noqa: BLE001 - any damage to a cache file means: compile again
        logging.warning("compiled program %s is unreadable (%s: %s); compiling it again", path, type(e).__name__, e)
    concurrent.futures.wait(list(_preloaded.values()))  # no compilation beside a read-ahead in flight
    compiled = _compile_bypassing_jax_cache(self._jit.lower(*args, **kwargs))
    try:
      blob = pickle.dumps(serialize_executable.serialize(compiled))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      write_atomically(path, lambda tmp: pathlib.Path(tmp).write_bytes(blob))
    except (OSError, ValueError, NotImplementedError, pickle.PicklingError) as e:
      logging.warning("could not store the compiled program %s: %s", path, e)
    return compiled


# A compiler option at its default value: it changes nothing in the program but keys its compilation apart from the
# plain jit's in JAX's in-memory cache, which would otherwise hand back the executable that jit loaded from disk.
_OWN_COMPILATION = {"xla_embed_ir_in_executable": False}


def _compile_bypassing_jax_cache(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """``lowered.compile()``, compiled by XLA here and now: neither from JAX's persistent cache nor from its memory.

  In jaxlib 0.10.2 an executable that JAX's persistent cache loaded serializes without some of its kernels (the
  stored copy fails when run: "Function concatenate.1_kernel not found"). JAX decides once per process whether its
  cache is used (``is_cache_used`` memoizes it), so turning ``jax_enable_compilation_cache`` off is not enough after
  the first compilation: the cache's state is reset around the switch, and reset again so that the next compilation
  decides afresh with the cache back on. A plain jit of the same function may already hold a cache-loaded
  executable in memory: ``_OWN_COMPILATION`` keys this compilation apart from it.
  """
  cache_on = jax.config.values["jax_enable_compilation_cache"]
  compilation_cache.reset_cache()
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return lowered.compile(compiler_options=_OWN_COMPILATION)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_on)
    compilation_cache.reset_cache()


def program(pipe, fn: Callable, *static) -> Program:
  """A ``Program`` for ``fn`` of ``pipe``, stored under the pipeline's fingerprint and ``static`` (the task's
  name and static options: anything ``fingerprint`` describes); plain jit for a pipeline without one."""
  key = None if pipe.fingerprint is None else fingerprint(pipe.fingerprint, *static)
  return Program(fn, key)
