"""Adapters: parameter-tree transformations beside a frozen base (LoRA; see ``lora`` for the layout).

``lora``: ``Lora`` factors, ``init_lora``, ``merge`` / ``unmerge`` and ``num_params``;
``lora_files``: diffusers / kohya LoRA safetensors <-> adapters, and ``merge_lora_files`` for a
pipeline's params.
"""

from diffjax.adapters.lora import DEFAULT_TARGETS, Adapters, Lora, LoraConfig, init_lora, merge, num_params, unmerge
from diffjax.adapters.lora_files import merge_lora_files, read_lora, write_lora

__all__ = ["DEFAULT_TARGETS", "Adapters", "Lora", "LoraConfig", "init_lora", "merge", "merge_lora_files", "num_params",
           "read_lora", "unmerge", "write_lora"]
