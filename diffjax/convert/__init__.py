"""Weight import/export: Stable Diffusion, diffusers and transformers checkpoints <-> diffjax parameters."""

from diffjax.convert.controlnet import load_controlnet, save_controlnet
from diffjax.convert.files import PickleRefusedError, WeightFileError, read_safetensors, write_safetensors
from diffjax.convert.keys import WeightMismatchError
from diffjax.convert.pretrained import load_pretrained, save_pretrained

__all__ = ['PickleRefusedError', 'WeightFileError', 'WeightMismatchError', 'load_controlnet', 'load_pretrained',
           'read_safetensors', 'save_controlnet', 'save_pretrained', 'write_safetensors']
