"""The FID Inception against pytorch-fid's on the same random weights, and FID against pytorch-fid's formula.

The weights are diffjax's parameter tree with random values, written in the PyTorch layout
and loaded by pytorch-fid's ``fid_inception_v3`` with ``strict=True`` (so every key and
shape of the released file's layout is checked) in place of the download.

pytorch-fid builds on torchvision's Inception3. PyPI's torchvision is built for CUDA torch:
installed next to the CPU torch it fails to register its C++ operators, and then transformers
and diffusers, which import it when present, fail too. So the README's test command puts it
apart (``pip install --no-deps --target .reference torchvision==0.28.0``), and
``_pytorch_fid`` imports only its pure-Python model files from there (without the package's
``__init__``), builds the reference and takes them out of ``sys.modules`` again.
"""

import contextlib
import importlib
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.convert.files import write_safetensors
from diffjax.convert.keys import state_dict_from_flax
from diffjax.evaluate import fid as fid_lib
from diffjax.evaluate.frechet import feature_statistics, frechet_distance

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference
TORCHVISION_DIR = os.environ.get("DIFFJAX_TORCHVISION_DIR",
                                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".reference"))


@contextlib.contextmanager
def _torchvision_models():
  """torchvision's Python model files (from TORCHVISION_DIR) importable inside the block, gone after it."""
  root = os.path.join(TORCHVISION_DIR, "torchvision")
  if not os.path.isfile(os.path.join(root, "models", "inception.py")):
    pytest.skip(f"no torchvision in {TORCHVISION_DIR} (pip install --no-deps --target .reference torchvision==0.28.0)")
  saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "torchvision" or m.startswith("torchvision.")}
  package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
  package.__path__, models.__path__ = [root], [os.path.join(root, "models")]
  package.__version__, package.models = "0.28.0", models
  sys.modules["torchvision"], sys.modules["torchvision.models"] = package, models
  try:
    inception = importlib.import_module("torchvision.models.inception")
    models.inception, models.inception_v3 = inception, inception.inception_v3
    yield
  finally:
    for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[m]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def reference(monkeypatch_module):
  """(pytorch-fid InceptionV3 on random weights, the same weights as diffjax params, their state dict,
  pytorch-fid's calculate_frechet_distance)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":  # He-scaled, so that activations keep their size through the 90-odd layers
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0.0, 0.1, leaf.shape)

  params = jax.tree_util.tree_map_with_path(lambda p, l: draw(p, l).astype(np.float32), fid_lib.param_shapes())
  state = state_dict_from_flax(params)
  state |= {k.replace("running_mean", "num_batches_tracked"): np.array(0) for k in state if k.endswith("running_mean")}
  state |= {"fc.weight": rng.normal(size=(1008, 2048)).astype(np.float32), "fc.bias": np.zeros(1008, np.float32)}
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
  with _torchvision_models():
    pf = pytest.importorskip("pytorch_fid.inception")
    from pytorch_fid.fid_score import calculate_frechet_distance
    monkeypatch_module.setattr(pf, "load_state_dict_from_url", lambda *a, **k: tensors)
    net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  return net, jax.tree.map(jnp.asarray, params), state, calculate_frechet_distance


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.mark.parametrize("size", [299, 64, 331])  # as is; upsampled; downsampled (no antialiasing on either side)
def test_features_match_pytorch_fid(reference, size):
  net, params, _, _ = reference
  images = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  ours = fid_lib.inception_features(params, images, batch_size=2)
  scale = np.abs(ref).max()
  assert scale > 1e-2  # the random network did not collapse
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * scale)


def test_weight_file_and_statistics_round_trip(reference, tmp_path):
  _, params, state, _ = reference
  write_safetensors(tmp_path / "fid.safetensors", {k: np.asarray(v) for k, v in state.items()})
  loaded = fid_lib.load_fid_inception(tmp_path / "fid.safetensors")
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, params))
  rng = np.random.default_rng(1)
  mu, sigma = rng.normal(size=2048), np.cov(rng.normal(size=(3000, 2048)), rowvar=False)
  fid_lib.save_statistics(tmp_path / "ref.npz", mu, sigma)
  back = fid_lib.load_statistics(tmp_path / "ref.npz")
  np.testing.assert_array_equal(back[0], mu)
  np.testing.assert_array_equal(back[1], sigma)
  fid_lib.save_statistics(tmp_path / "small.npz", mu[:3], sigma[:3, :3])
  with pytest.raises(ValueError, match="not the FID Inception"):
    fid_lib.load_statistics(tmp_path / "small.npz")
  with pytest.raises(FileNotFoundError, match="FID Inception weights"):
    fid_lib.load_fid_inception(tmp_path / "missing.safetensors")


def test_frechet_distance_matches_pytorch_fid(reference):
  calculate_frechet_distance = reference[3]
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(400, 32)), rng.normal(0.2, 1.1, size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3
  ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
  ref = calculate_frechet_distance(*feature_statistics(a), *feature_statistics(b))
  assert ours == pytest.approx(float(ref), rel=1e-9)
