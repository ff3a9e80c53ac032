"""Declarative sharding of the training state: logical axis names -> mesh axes -> ``NamedSharding``.

Parameters carry logical axis names (``diffjax.models.layers``: ``embed``, ``mlp``,
``conv_h``, ``conv_w``, ``norm``, ``vocab``). A list of rules ``((logical, mesh_axis),
...)`` maps them onto the axes of a ``jax.sharding.Mesh`` (``data``, ``fsdp``), e.g.
``(("embed", "fsdp"), ("mlp", "fsdp"))`` shards every kernel over ``fsdp`` (FSDP /
ZeRO-3: XLA all-gathers a weight where it is used and reduce-scatters its gradient).

Rules are tried in order and each array dimension takes the first rule that fits: a
mesh axis is used at most once per array, and a rule is skipped for a dimension its
mesh axes do not divide (that dimension stays replicated, so e.g. a 1-channel input
convolution is sharded over its output channels instead). Mesh axes of size 1 are
left out, so with ``fsdp=1`` every parameter is replicated exactly as without rules.
The optimizer state mirrors the parameters' shardings (``optax.tree.map_params``);
its scalars (step counts) are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.models import layers

# Every logical axis name the diffjax models use.
LOGICAL_AXES = frozenset(layers.DENSE_KERNEL_AXES + layers.CONV_KERNEL_AXES + layers.BIAS_AXES + layers.NORM_AXES
                         + layers.EMBED_AXES)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis; tried in order. Kernels are sharded over their input features
# ('embed'), or their output features ('mlp') where 'embed' does not divide.
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", "fsdp"))


def _mesh_axes(rule_target) -> tuple[str, ...]:
  if rule_target is None:
    return ()
  return (rule_target,) if isinstance(rule_target, str) else tuple(rule_target)


def check_rules(rules: Rules, mesh_axis_names: Sequence[str]) -> str | None:
  """None if ``rules`` are well formed, else what they should be (for a config error message)."""
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      return f"pairs (logical axis name, mesh axis or None), not {rule!r}"
    if rule[0] not in LOGICAL_AXES:
      return f"logical axes from {sorted(LOGICAL_AXES)} (rule {tuple(rule)!r} names {rule[0]!r})"
    unknown = [a for a in _mesh_axes(rule[1]) if a not in mesh_axis_names]
    if unknown:
      return f"mesh axes from {list(mesh_axis_names)} (rule {tuple(rule)!r} names {unknown})"
  return None


def partition_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                   mesh_shape: dict[str, int]) -> PartitionSpec:
  """The mesh ``PartitionSpec`` of one array with logical axis ``names`` and ``shape`` (see module doc)."""
  spec: list = [None] * len(shape)
  used: set[str] = set()
  for logical, target in rules:
    axes = tuple(a for a in _mesh_axes(target) if mesh_shape[a] > 1)
    size = math.prod(mesh_shape[a] for a in axes)
    if not axes or used.intersection(axes):
      continue
    for i, name in enumerate(names):
      if name == logical and spec[i] is None and shape[i] % size == 0:
        spec[i] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
  return PartitionSpec(*spec)


def param_shardings(boxed_params, mesh: Mesh, rules: Rules):
  """``NamedSharding`` tree (the structure of the unboxed params) from abstract boxed params.

  Args:
    boxed_params: ``jax.eval_shape`` of ``model.init(...)["params"]``: leaves are
      ``nn.Partitioned`` boxes (logical names) around ``ShapeDtypeStruct``; a leaf
      without names is replicated.
    mesh: the device mesh; rules: ``((logical, mesh axis or None), ...)``.
  """
  mesh_shape = dict(mesh.shape)

  def sharding(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, partition_spec(leaf.names, leaf.value.shape, rules, mesh_shape))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(abstract_state, params_sharding, tx: optax.GradientTransformation, mesh: Mesh):
  """Shardings of a ``steps.TrainState``: params and EMA params as ``params_sharding``, the
  optimizer state's parameter-shaped parts likewise, everything else (step, RNG, counts) replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sharding = optax.tree.map_params(tx, lambda _, s: s, abstract_state.opt_state, params_sharding,
                                       transform_non_params=lambda _: replicated)
  return abstract_state.replace(step=replicated, params=params_sharding, ema_params=params_sharding,
                                opt_state=opt_sharding, rng=replicated)


def with_shardings(abstract, shardings):
  """``ShapeDtypeStruct`` tree carrying ``shardings`` (for a sharded checkpoint restore)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def describe(shardings) -> str:
  """One line: how many arrays are sharded, and over which mesh axes (for the log)."""
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  sharded = [s for s in specs if any(a is not None for a in s)]
  axes = sorted({a for s in sharded for part in s if part is not None for a in _mesh_axes(part)})
  return f"{len(sharded)} of {len(specs)} arrays sharded (over {axes or 'no axes'})"
