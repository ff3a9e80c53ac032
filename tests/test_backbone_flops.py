"""benchmarks/backbone_flops.py: the FLOPs it counts behave as a count of a stack of identical blocks must."""

from benchmarks import backbone_flops


def _count(config: str, *overrides: str) -> dict:
  return backbone_flops.step_flops(backbone_flops._load(config, list(overrides)), latent_shape=(8, 8, 4))


def test_each_joint_block_adds_the_same_count_and_its_gradient_costs_two_forwards():
  one, two, three = (_count("configs/shapes_mmdit.py:tiny", f"model.depth={d}", "data.batch_size=4") for d in (1, 2, 3))
  for key in ("forward", "train", "params"):
    # adding a layer adds one full joint block (the last, text-output-free block stays last): equal increments,
    # up to float32 rounding of XLA's sums (measured: 4 FLOPs in 1.9e7)
    first, second = two[key] - one[key], three[key] - two[key]
    assert first > 0 and abs(second - first) <= 1e-6 * first, (key, first, second)
  # reverse mode costs two products per forward product (input and weight gradients); the elementwise work of the
  # norms, modulations and softmax moves the ratio a little (measured 1.98)
  block_forward = three["forward"] - two["forward"]
  ratio = (three["train"] - two["train"] - block_forward) / block_forward
  assert 1.8 < ratio < 2.2, ratio


def test_the_count_is_affine_in_the_batch():
  """Per-sample work grows with the batch; what does not depend on it (the time-embedding frequencies, the
  parameters' own elementwise work in the gradient) is a constant: equal increments per added pair of samples."""
  two, four, six = (_count("configs/shapes_ldm.py:tiny", f"data.batch_size={b}") for b in (2, 4, 6))
  assert two["params"] == four["params"] == six["params"]
  for key in ("forward", "train"):
    first, second = four[key] - two[key], six[key] - four[key]
    assert first > 0 and abs(second - first) <= 1e-6 * first, (key, first, second)
