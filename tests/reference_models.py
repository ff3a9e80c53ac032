"""Helpers for parity tests against PyTorch reference models (the ``reference`` extra)."""

from diffjax.convert import save_pretrained


def jiggle(module, scale: float = 0.05, seed: int = 0):
  """Adds seeded Gaussian noise (std ``scale``) to every parameter of a torch module (so that zero-initialised
  gates and biases take part in the comparison); returns it in eval mode."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))
  return module.eval()


def assert_exports_back(module, params, reference, folder) -> None:
  """diffjax's ``save_pretrained`` of ``module`` writes a folder that the reference class reads back with the
  reference's own state dict, bit for bit."""
  import torch
  save_pretrained(module, params, folder)
  back = type(reference).from_pretrained(folder).eval()
  sa, sb = reference.state_dict(), back.state_dict()
  assert sa.keys() == sb.keys()
  assert all(torch.equal(sa[k], sb[k]) for k in sa)


def flux_outputs(ref, module, params, tokens, context, pooled, t, scale, img_ids, txt_ids):
  """(diffjax, diffusers) outputs of a Flux transformer on the same packed ``tokens`` (B, N, C), ``context``
  (B, L, joint width), ``pooled`` (B, P), times ``t`` (B,), guidance ``scale`` (B,) or None and rotary ids."""
  import jax
  import numpy as np
  import torch

  from diffjax.models.flux import rotary_for
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(context),
               pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
               img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
               guidance=None if scale is None else torch.from_numpy(scale)).sample.numpy()
  rotary = rotary_for(module.config, img_ids, txt_ids)
  got = np.asarray(jax.jit(module.apply)({'params': params}, tokens, t, context, pooled, rotary, scale))
  return got, want
