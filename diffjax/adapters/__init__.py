"""Adapters: parameter-tree transformations beside a frozen base (LoRA, textual inversion).

``lora``: ``Lora`` factors, ``init_lora``, ``merge`` / ``unmerge`` and ``num_params``;
``lora_files``: diffusers / kohya LoRA safetensors <-> adapters, and ``merge_lora_files`` for a
pipeline's params; ``textual_inversion``: learned token embeddings (``Embedding``) <-> files, added
tokens and extra rows of the text encoders' token tables.
"""

from diffjax.adapters.lora import DEFAULT_TARGETS, Adapters, Lora, LoraConfig, init_lora, merge, num_params, unmerge
from diffjax.adapters.lora_files import merge_lora_files, read_lora, write_lora
from diffjax.adapters.textual_inversion import (
    Embedding,
    add_embedding,
    expand_prompt,
    extend_embeddings,
    extract_embedding,
    fit_config,
    initial_vectors,
    load_textual_inversion,
    read_embedding,
    split_embeddings,
    vector_tokens,
    write_embedding,
)

__all__ = ["DEFAULT_TARGETS", "Adapters", "Embedding", "Lora", "LoraConfig", "add_embedding", "expand_prompt",
           "extend_embeddings", "extract_embedding", "fit_config", "init_lora", "initial_vectors",
           "load_textual_inversion", "merge", "merge_lora_files", "num_params", "read_embedding", "read_lora",
           "split_embeddings", "unmerge", "vector_tokens", "write_embedding", "write_lora"]
