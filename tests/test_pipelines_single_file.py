"""Original single-file SD checkpoints as pipelines: the same networks, scheduler and images as the folder.

A tiny random SD 1.x-shaped diffusers pipeline (8 heads and 32 norm groups, what the LDM
shape inference assumes) is saved as a folder and, renamed to LDM keys, as one
``.safetensors`` file. ``from_single_file`` with the folder's tokenizer must give the same
parameters bit for bit, the SD 1.5 folder's PNDM plan, and the same images; the folder's
images are parity-checked against diffusers in test_pipelines_parity.py.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_convert import _to_ldm
from test_pipelines_parity import CORPUS, NEGATIVE, PROMPTS, SCHEDULERS, SD_SCHEDULER, SIZE, _perturb, _train_bpe

from diffjax import pipelines
from diffjax.convert import ldm
from diffjax.convert.configs import unet_config_from_diffusers, vae_config_from_diffusers
from diffjax.convert.files import write_safetensors
from diffjax.pipelines.single_file import scheduler_for

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(diffusers folder, single file with the same weights)."""
  tmp = tmp_path_factory.mktemp("single")
  torch.manual_seed(0)
  vocab, merges = _train_bpe(CORPUS + PROMPTS + NEGATIVE, 120)
  tok = tmp / "tok"
  tok.mkdir()
  (tok / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                  encoding="utf-8")
  tokenizer = transformers.CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=16)
  text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(  # 64-dim heads, as the inference assumes
      vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
      max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu")))
  unet = _perturb(diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=8))
  vae = _perturb(diffusers.AutoencoderKL(
      block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, sample_size=SIZE,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), scale=0.02)
  cls, options = SCHEDULERS["pndm"]
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=getattr(diffusers, cls)(
          **SD_SCHEDULER, **options), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(tmp / "sd")
  single = {ldm.UNET_PREFIX + k: v for k, v in _to_ldm(
      unet.state_dict(), ldm.unet_ldm_renames(unet_config_from_diffusers(dict(unet.config)))).items()}
  single |= {ldm.VAE_PREFIX + k: v for k, v in _to_ldm(
      vae.state_dict(), ldm.vae_ldm_renames(vae_config_from_diffusers(dict(vae.config))), conv_attention=True).items()}
  single |= {ldm.CLIP_PREFIX + k: v.numpy() for k, v in text.state_dict().items()}
  write_safetensors(tmp / "sd.safetensors", single)
  return tmp / "sd", tmp / "sd.safetensors", single


def test_single_file_is_the_folder(checkpoint):
  folder, file, _ = checkpoint
  pipe_f, params_f = pipelines.from_pretrained(folder)
  pipe_s, params_s = pipelines.from_single_file(file, tokenizer=folder / "tokenizer")
  jax.tree.map(np.testing.assert_array_equal, params_s, params_f)
  assert pipe_s.scheduler.class_name == "PNDMScheduler" and pipe_s.target == pipe_f.target == "eps"
  plan_s, plan_f = pipelines.plan_for(pipe_s, 6), pipelines.plan_for(pipe_f, 6)
  np.testing.assert_array_equal(plan_s.ts, plan_f.ts)
  kw = dict(negative_prompts=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=7.5, seed=3)
  out_s = pipelines.generate(pipe_s, params_s, PROMPTS, plan=plan_s, **kw)
  out_f = pipelines.generate(pipe_f, params_f, PROMPTS, plan=plan_f, **kw)
  # The same parameters, scheduler and program: float32 results agree to the last bit, except
  # where XLA fuses two separately traced (identical) closures differently; 1e-6 bounds that.
  np.testing.assert_allclose(out_s.images, out_f.images, rtol=0, atol=1e-6)
  assert float(np.std(out_s.images)) > 1e-3  # not a constant image
  v, _ = pipelines.from_single_file(file, tokenizer=folder / "tokenizer", prediction_type="v_prediction")
  assert v.target == "v"


def test_scheduler_defaults_by_family():
  assert scheduler_for("sd1")["_class_name"] == "PNDMScheduler"
  assert scheduler_for("sd1")["prediction_type"] == "epsilon"
  sd2 = scheduler_for("sd2")
  assert (sd2["_class_name"], sd2["prediction_type"], sd2["clip_sample"]) == ("DDIMScheduler", "v_prediction", False)
  assert scheduler_for("sd2", global_step=875000)["prediction_type"] == "epsilon"  # SD 2 base
  assert scheduler_for("sd2", prediction_type="epsilon")["prediction_type"] == "epsilon"
  for family in ("sd1", "sd2"):
    c = scheduler_for(family)
    assert (c["beta_start"], c["beta_end"], c["beta_schedule"], c["steps_offset"], c["timestep_spacing"]) == (
        0.00085, 0.012, "scaled_linear", 1, "leading")


def test_bad_single_files(checkpoint, tmp_path):
  folder, file, single = checkpoint
  with pytest.raises(ValueError, match="lacks vae"):
    no_vae = tmp_path / "no_vae.safetensors"
    write_safetensors(no_vae, {k: v for k, v in single.items() if not k.startswith(ldm.VAE_PREFIX)})
    pipelines.from_single_file(no_vae, tokenizer=folder / "tokenizer")
  with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
    pipelines.from_single_file(file, tokenizer=tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipelines.from_single_file(tmp_path / "missing.safetensors", tokenizer=folder / "tokenizer")
  with pytest.raises(ValueError, match="prediction_type"):
    pipelines.from_single_file(file, tokenizer=folder / "tokenizer", prediction_type="x0")


def test_generation_job_reads_a_single_file(checkpoint, tmp_path):
  from configs import generate as generate_config
  from diffjax import generation
  folder, file, _ = checkpoint
  config = generate_config.get_config("tiny")
  config.update(pretrained=str(file), tokenizer=str(folder / "tokenizer"), height=SIZE, width=SIZE,
                prompts=(PROMPTS[0],), compilation_cache="")
  config.sampler.steps = 2
  record = generation.generate(config, str(tmp_path))
  assert record["kind"] == "single_file" and record["plan"]["solver"] == "pndm"
  assert record["weights_sha256"] == {"sd.safetensors": generation._sha256(str(file))}
  assert (tmp_path / "0000.png").exists()
