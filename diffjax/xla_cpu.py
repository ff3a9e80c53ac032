"""XLA:CPU settings that diffjax applies on import (before the first computation creates the backend).

Convolutions go to XLA's Eigen kernels instead of YNNPACK fusions; matmuls and reductions
stay with YNNPACK. Measured on a 2-core CPU (benchmarks/README_models.md, three A/B runs of
``python benchmarks/model_throughput.py --reps 5 --torch-threads 1``; medians): the U-Net
training step 1.27x and forward 1.35x faster, the VAE training step 1.45x, VAE decoding
1.53x. YNNPACK computes a convolution's weight gradient as a convolution only batch-size
deep, which was the largest item of the CPU profile. GPUs and TPUs ignore the flag. A
``xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as the user set it.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def apply() -> None:
  """Adds ``FLAG`` to the ``XLA_FLAGS`` environment variable unless that already sets the option."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
