"""XLA:CPU settings that diffjax applies on import (before the first computation creates the backend).

Convolutions go to XLA's Eigen kernels instead of YNNPACK fusions, and so do reductions;
matmuls stay with YNNPACK. Reductions leave it for correctness: in jaxlib 0.10.2 YNNPACK's
reduce fusion miscomputes the max of a dot -> elementwise -> max chain with constant operands
(a softmax's max after the matrix products of a Gaussian mixture's log-densities: -inf, NaN or
garbage that changes from call to call, where float64 gives -1041; ``tests/test_xla_cpu.py``),
which made the fitted sampler's calibration crash on 128- and 256-D mixtures. jaxlib's own
default (dots, convolutions and reductions in YNNPACK) has the same defect. It costs the
CPU models 6-12% (benchmarks/README_models.md). Convolutions out of YNNPACK, measured on a
2-core CPU (benchmarks/README_models.md, three A/B runs of ``python
benchmarks/model_throughput.py --reps 5 --torch-threads 1``; medians): the U-Net training
step 1.27x and forward 1.35x faster, the VAE training step 1.45x, VAE decoding 1.53x.
YNNPACK computes a convolution's weight gradient as a convolution only batch-size deep,
which was the largest item of the CPU profile. GPUs and TPUs ignore the flag. A
``xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as the user set it.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def apply() -> None:
  """Adds ``FLAG`` to the ``XLA_FLAGS`` environment variable unless that already sets the option."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
