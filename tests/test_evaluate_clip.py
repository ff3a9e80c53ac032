"""CLIP's two towers and the CLIP score against transformers' ``CLIPModel`` on a tiny random model.

A ``CLIPModel`` with random weights and a small BPE vocabulary made here is saved with
``save_pretrained`` and loaded by ``clip_score.load_clip``; image and text embeddings, the
preprocessing (against ``CLIPImageProcessor`` on images of odd sizes) and the scores are compared.
"""

import json

import numpy as np
import pytest
from test_tokenizers import CORPUS, _train_bpe

from diffjax.evaluate import clip_score

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference
PROMPTS = ["a handwritten digit seven", "a red circle on the left", "the quick brown fox"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip")
  vocab, merges = _train_bpe(CORPUS + PROMPTS, 120)
  (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                     encoding="utf-8")
  eos = vocab["<|endoftext|>"]
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=20, bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=eos, pad_token_id=eos),
      vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                         image_size=32, patch_size=8),
      projection_dim=24)
  torch.manual_seed(0)
  ref = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # away from the initialization's zeros and ones, so that every parameter matters
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ref.save_pretrained(folder)
  tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                         model_max_length=20)
  tokenizer.save_pretrained(folder)
  return ref, tokenizer, clip_score.load_clip(folder)


def test_preprocessing_matches_clip_image_processor():
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  for shape in [(45, 70, 3), (90, 41, 3), (32, 32, 3)]:
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = clip_score.preprocess(image[None], 32)[0]
    # float32 arithmetic on the same uint8 pixels: a few units of float32 rounding of values of size ~2.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_embeddings_and_scores_match_transformers(tiny_clip):
  ref, tokenizer, (model, params, our_tokenizer) = tiny_clip
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)
  pixels = clip_score.preprocess(images, 32)
  ids = np.asarray(our_tokenizer(PROMPTS).input_ids, np.int32)
  np.testing.assert_array_equal(ids, tokenizer(PROMPTS, padding="max_length", max_length=20).input_ids)
  with torch.no_grad():
    pv, ti = torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(ids).long()
    out = ref(input_ids=ti, pixel_values=pv)
    ref_image, ref_text = out.image_embeds.numpy(), out.text_embeds.numpy()  # (L2-normalized by transformers)
  image = np.asarray(model.apply({"params": params}, pixels, method=model.encode_image))
  text = np.asarray(model.apply({"params": params}, ids, method=model.encode_text))
  unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(image), ref_image, rtol=0, atol=1e-5)
  np.testing.assert_allclose(unit(text), ref_text, rtol=0, atol=1e-5)
  scores = clip_score.clip_scores(model, params, our_tokenizer, images, PROMPTS)
  np.testing.assert_allclose(scores, 100.0 * np.maximum(np.sum(ref_image * ref_text, -1), 0.0), rtol=0, atol=1e-3)
  assert clip_score.clip_score(model, params, our_tokenizer, images, PROMPTS) == pytest.approx(scores.mean())


def test_bad_inputs(tiny_clip, tmp_path):
  _, _, (model, params, tokenizer) = tiny_clip
  with pytest.raises(ValueError, match="one prompt per image"):
    clip_score.clip_scores(model, params, tokenizer, np.zeros((2, 32, 32, 3), np.uint8), ["a"])
  with pytest.raises(ValueError, match="uint8, or float"):
    clip_score.preprocess(np.full((1, 32, 32, 3), 2.0))
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip_score.load_clip(tmp_path)
