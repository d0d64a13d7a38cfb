"""Tests of t3_jax.training.data: preparing a latent cache from tiny mp4s and reading it back."""

import json
import sys
import zlib

import imageio_ffmpeg
import numpy as np
import pytest

from t3_jax.training import data

FPS = 8
SRC_H, SRC_W, SRC_FRAMES = 32, 48, 12  # source videos
H, W, FRAMES = 16, 16, 9  # prepared size: 4k+1 frames
TEXT_DIM, TEXT_PAD = 8, 12


def write_video(path, frames):
  """Near-lossless mp4 (x264 qp 0, 4:4:4) so that pixel values survive the round trip."""
  f, h, w, _ = frames.shape
  writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=FPS, codec="libx264", macro_block_size=1,
                                       pix_fmt_out="yuv444p", output_params=["-qp", "0"])
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def pattern_video(seed):
  """Left/middle/right thirds red/green/blue; a bottom band whose grey level is 20 x frame index."""
  video = np.zeros((SRC_FRAMES, SRC_H, SRC_W, 3), np.uint8)
  video[:, :, :16, 0] = video[:, :, 16:32, 1] = video[:, :, 32:, 2] = 255
  video[:, 24:] = (20 * np.arange(SRC_FRAMES, dtype=np.uint8))[:, None, None, None]
  video[:, :4, :4] = 10 * seed  # makes each clip's latents distinct
  return video


def fake_encode(video):
  """Stands in for the VAE: [3, F, H, W] -> [4, 1 + (F - 1) / 4, H / 8, W / 8], a pure function."""
  sub = video[:, ::4, ::8, ::8]
  return np.concatenate([sub, sub.mean(0, keepdims=True) * 3.3], 0)


def fake_text(prompts):
  """Stands in for umT5: one token per word; the padded rows hold junk that must not be stored."""
  context = np.full((len(prompts), TEXT_PAD, TEXT_DIM), 7.0, np.float32)
  lengths = np.array([min(len(p.split()), TEXT_PAD) for p in prompts])
  for i, (prompt, length) in enumerate(zip(prompts, lengths)):
    rng = np.random.default_rng(zlib.crc32(prompt.encode()))
    context[i, :length] = rng.standard_normal((length, TEXT_DIM)) * 50
  return context, lengths


PROMPTS = ["a leopard rests near a tree", "aerial view of a coastal town", "waves",
           "a city street at night with neon signs and rain", "snowy mountain ridge", "a red fox"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  (root / "vids").mkdir()
  entries = []
  for i, prompt in enumerate(PROMPTS):
    write_video(root / "vids" / f"clip{i}.mp4", pattern_video(i))
    entries.append({"data_file": f"vids/clip{i}.mp4", "prompt_en": prompt})
  captions = root / "captions.json"
  captions.write_text(json.dumps(entries))
  return root, captions


@pytest.fixture(scope="module")
def dataset(videos, tmp_path_factory):
  """Prepared by two 'processes' (two calls); the second to finish writes the metadata."""
  root, captions = videos
  out = tmp_path_factory.mktemp("ds") / "cache"
  items = data.load_captions(captions, root)
  for process_index in (1, 0):
    data.prepare_dataset(items, out, fake_encode, fake_text, height=H, width=W, frames=FRAMES,
                         process_index=process_index, process_count=2, text_batch_size=2,
                         metadata={"vae": "fake"}, progress=False)
  return out, items


def test_read_video_scales_crops_and_samples_frames(videos):
  root, _ = videos
  path = root / "vids" / "clip0.mp4"
  video = data.read_video(path, H, W, FRAMES)
  assert video.shape == (FRAMES, H, W, 3) and video.dtype == np.uint8
  # Scaled by 1/2 to 24x16 (covering 16x16), then 4 columns cropped each side: the source's
  # columns 8..40, i.e. 4 red, 8 green, 4 blue columns.
  mid = video[0, 8].astype(int)
  for column, colour in ((1, 0), (8, 1), (14, 2)):
    np.testing.assert_allclose(mid[column], 255 * np.eye(3)[colour], atol=24)
  # The first 9 frames, in order (bottom band grey = 20 x frame index).
  np.testing.assert_allclose(video[:, 15, 8, 0], 20 * np.arange(FRAMES), atol=6)
  # Resampled to half the frame rate: every other frame.
  half = data.read_video(path, H, W, 5, fps=FPS / 2)
  np.testing.assert_allclose(half[:, 15, 8, 0], 40 * np.arange(5), atol=6)
  with pytest.raises(ValueError, match="fewer than the 13 requested"):
    data.read_video(path, H, W, 13)
  x = data.video_to_model_input(video)
  assert x.shape == (3, FRAMES, H, W) and x.dtype == np.float32
  np.testing.assert_allclose(x, np.moveaxis(video, -1, 0) / 127.5 - 1.0, atol=1e-6)


def test_prepared_examples_round_trip(dataset, videos):
  out, items = dataset
  root, _ = videos
  loader = data.LatentLoader(out, 1, seed=0, process_index=0, process_count=1, prefetch=0)
  assert loader.num_examples == len(PROMPTS)
  assert loader.latent_shape == (4, 3, 2, 2) and loader.text_dim == TEXT_DIM
  assert loader.metadata["height"] == H and loader.metadata["frames"] == FRAMES
  assert loader.metadata["vae"] == "fake" and loader.metadata["skipped"] == []
  # Shard 0 holds items 0, 2, 4 and comes first; shard 1 holds 1, 3, 5.
  order = [0, 2, 4, 1, 3, 5]
  for index, item_id in enumerate(order):
    item, example = items[item_id], loader.example(index)
    assert example["source"] == item.source == f"vids/clip{item_id}.mp4"
    assert example["caption"] == item.prompt
    expected = fake_encode(data.video_to_model_input(data.read_video(item.path, H, W, FRAMES)))
    assert example["latents"].dtype == np.float16
    np.testing.assert_array_equal(example["latents"], expected.astype(np.float16))
    np.testing.assert_allclose(example["latents"], expected, rtol=1e-3, atol=1e-4)
    context, lengths = fake_text([item.prompt])
    assert example["context"].shape == (lengths[0], TEXT_DIM)  # only the valid tokens are stored
    np.testing.assert_allclose(example["context"], context[0, :lengths[0]], rtol=1e-3)
  assert "tensorflow" not in sys.modules  # written and read without TensorFlow


def test_loader_batches_are_padded_float32(dataset):
  out, _ = dataset
  loader = data.LatentLoader(out, 3, seed=1, process_index=0, process_count=1)
  batch = next(loader)
  assert batch["latents"].shape == (3, 4, 3, 2, 2) and batch["latents"].dtype == np.float32
  assert batch["context"].shape == (3, data.TEXT_LEN, TEXT_DIM) and batch["context"].dtype == np.float32
  for j, index in enumerate(batch["index"]):
    example = loader.example(index)
    length = len(example["context"])
    assert batch["context_lengths"][j] == length
    np.testing.assert_array_equal(batch["latents"][j], example["latents"].astype(np.float32))
    np.testing.assert_array_equal(batch["context"][j, :length], example["context"].astype(np.float32))
    assert not batch["context"][j, length:].any()  # zero-padded like Wan, the junk rows dropped
  loader.close()


def indices(loader, steps):
  return [next(loader)["index"].tolist() for _ in range(steps)]


def test_processes_read_disjoint_slices_covering_each_epoch(dataset):
  out, _ = dataset
  loaders = [data.LatentLoader(out, 1, seed=3, process_index=p, process_count=3) for p in range(3)]
  assert loaders[0].steps_per_epoch == 2
  per_process = [indices(loader, 4) for loader in loaders]  # two epochs
  for epoch in range(2):
    seen = [i for steps in per_process for step in steps[2 * epoch:2 * epoch + 2] for i in step]
    assert sorted(seen) == list(range(len(PROMPTS)))  # disjoint and complete
  # The global sequence does not depend on how it is split over processes.
  single = data.LatentLoader(out, 3, seed=3, process_index=0, process_count=1)
  joined = [sum((steps[s] for steps in per_process), []) for s in range(4)]
  assert indices(single, 4) == joined
  # With a global batch of 4, each epoch drops 6 mod 4 = 2 examples.
  pair = [data.LatentLoader(out, 2, seed=3, process_index=p, process_count=2) for p in range(2)]
  assert pair[0].steps_per_epoch == 1
  first, second = indices(pair[0], 1)[0], indices(pair[1], 1)[0]
  assert len(set(first + second)) == 4


def test_shuffle_is_deterministic_per_seed_and_epoch(dataset):
  out, _ = dataset
  a, b = (data.LatentLoader(out, 2, seed=5, process_index=0, process_count=1) for _ in range(2))
  run = indices(a, 9)
  assert run == indices(b, 9)
  epochs = [sum(run[3 * e:3 * e + 3], []) for e in range(3)]
  assert all(sorted(e) == list(range(6)) for e in epochs)
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled every epoch
  other = data.LatentLoader(out, 2, seed=6, process_index=0, process_count=1)
  assert indices(other, 9) != run


def test_resume_from_state_continues_the_sequence(dataset):
  out, _ = dataset
  loader = data.LatentLoader(out, 1, seed=2, process_index=1, process_count=2)
  indices(loader, 3)
  state = loader.get_state()
  assert state == {"step": 3, "seed": 2, "global_batch_size": 2, "num_examples": 6}
  rest = [next(loader) for _ in range(5)]
  resumed = data.LatentLoader(out, 1, seed=2, process_index=1, process_count=2)
  resumed.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip
  for expected in rest:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  loader.set_state(np.asarray(3))  # rewinding the same loader (discarding its prefetched batches) also works
  assert next(loader)["index"].tolist() == rest[0]["index"].tolist()
  with pytest.raises(ValueError, match="seed=2"):
    data.LatentLoader(out, 1, seed=9, process_index=1, process_count=2).set_state(state)
  with pytest.raises(ValueError, match="global_batch_size"):
    data.LatentLoader(out, 3, seed=2, process_index=0, process_count=1).set_state(state)


def test_loaders_are_grain_pipelines_and_prefetch_changes_nothing(dataset):
  import grain

  out, _ = dataset
  ahead, plain = (data.LatentLoader(out, 2, seed=4, process_index=0, process_count=1, prefetch=p) for p in (3, 0))
  assert isinstance(ahead.dataset, grain.MapDataset)
  for step in range(5):
    got, expected = next(ahead), next(plain)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
    np.testing.assert_array_equal(ahead.batch(step)["index"], expected["index"])  # random access by step
  assert ahead.get_state()["step"] == 5  # grain's position, read ahead or not
  ahead.close()
  plain.close()


def test_synthetic_loader_is_deterministic_and_resumable():
  shape = (4, 3, 2, 2)

  def make(**kw):
    kw = {"seed": 0, "process_index": 0, "process_count": 1, "text_len": 16, "text_dim": TEXT_DIM, **kw}
    return data.SyntheticLoader(shape, kw.pop("batch", 2), **kw)

  a = make()
  batches = [next(a) for _ in range(4)]
  assert batches[0]["latents"].shape == (2, *shape) and batches[0]["context"].shape == (2, 16, TEXT_DIM)
  for batch in batches:
    for j, length in enumerate(batch["context_lengths"]):
      assert 1 <= length <= 16 and batch["context"][j, :length].all() and not batch["context"][j, length:].any()
  b = make()
  b.set_state(a.get_state() | {"step": 2})
  for expected in batches[2:]:
    got = next(b)
    np.testing.assert_array_equal(got["latents"], expected["latents"])
    np.testing.assert_array_equal(got["context"], expected["context"])
  assert not np.array_equal(next(make(seed=1))["latents"], batches[0]["latents"])
  # Two processes with one example each see the same global batch as one process with two.
  halves = [next(make(batch=1, process_index=p, process_count=2))["latents"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), batches[0]["latents"])


def test_bad_inputs_give_clear_errors(videos, tmp_path):
  root, captions = videos
  bad = tmp_path / "bad.json"
  bad.write_text('[{"data_file": "vids/clip0.mp4", "prompt_en": "x"},')
  with pytest.raises(ValueError, match="not valid JSON"):
    data.load_captions(bad, root)
  bad.write_text('[{"data_file": "vids/clip0.mp4"}]')
  with pytest.raises(ValueError, match='entry 0 .*"prompt_en"'):
    data.load_captions(bad, root)
  bad.write_text('{"data_file": "vids/clip0.mp4", "prompt_en": "x"}')
  with pytest.raises(ValueError, match="non-empty JSON list"):
    data.load_captions(bad, root)
  missing = json.loads(captions.read_text()) + [{"data_file": "vids/gone.mp4", "prompt_en": "x"}]
  bad.write_text(json.dumps(missing))
  with pytest.raises(FileNotFoundError, match="1 of 7 videos .* missing .*vids/gone.mp4"):
    data.load_captions(bad, root)
  with pytest.raises(FileNotFoundError, match="Captions file"):
    data.load_captions(tmp_path / "nope.json", root)
  with pytest.raises(FileNotFoundError, match="Videos folder"):
    data.load_captions(captions, tmp_path / "nope")

  items = data.load_captions(captions, root)[:1]
  with pytest.raises(ValueError, match="4k\\+1"):
    data.prepare_dataset(items, tmp_path / "o1", fake_encode, fake_text, height=H, width=W, frames=8)
  with pytest.raises(ValueError, match="multiples of 16"):
    data.prepare_dataset(items, tmp_path / "o1", fake_encode, fake_text, height=20, width=W, frames=9)
  with pytest.raises(FileNotFoundError, match="no prepared dataset"):
    data.LatentLoader(tmp_path, 1, process_index=0, process_count=1)


def test_corrupt_video_raises_or_is_skipped(videos, tmp_path):
  root, captions = videos
  (tmp_path / "vids").mkdir()
  (tmp_path / "vids" / "broken.mp4").write_bytes(b"not a video" * 100)
  (tmp_path / "vids" / "ok.mp4").symlink_to(root / "vids" / "clip0.mp4")
  entries = [{"data_file": "vids/broken.mp4", "prompt_en": "broken"},
             {"data_file": "vids/ok.mp4", "prompt_en": "fine clip"}]
  (tmp_path / "c.json").write_text(json.dumps(entries))
  items = data.load_captions(tmp_path / "c.json", tmp_path)
  kw = dict(height=H, width=W, frames=FRAMES, progress=False)
  with pytest.raises(ValueError, match="broken.mp4"):
    data.prepare_dataset(items, tmp_path / "strict", fake_encode, fake_text, **kw)
  data.prepare_dataset(items, tmp_path / "lenient", fake_encode, fake_text, skip_bad=True, **kw)
  loader = data.LatentLoader(tmp_path / "lenient", 1, process_index=0, process_count=1)
  assert loader.num_examples == 1 and loader.metadata["skipped"] == ["vids/broken.mp4"]
  with pytest.raises(FileExistsError, match="already exists"):
    data.prepare_dataset(items, tmp_path / "lenient", fake_encode, fake_text, skip_bad=True, **kw)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    data.LatentLoader(tmp_path / "lenient", 2, process_index=0, process_count=1)


def test_cli_prepare_wires_arguments(videos, tmp_path, monkeypatch):
  root, captions = videos
  seen = {}

  def fake_models(vae, umt5, tokenizer, **kw):
    seen.update(vae=vae, umt5=umt5, tokenizer=tokenizer, **kw)
    return fake_encode, fake_text

  monkeypatch.setattr(data, "_model_encoders", fake_models)
  out = tmp_path / "cli"
  data.main(["prepare", "--videos", str(root), "--captions", str(captions), "--output", str(out),
             "--vae", "v.pth", "--umt5", "t.pth", "--tokenizer", "tok", "--height", "16", "--width", "32",
             "--frames", "5"])
  assert seen == {"vae": "v.pth", "umt5": "t.pth", "tokenizer": "tok", "text_batch_size": 8,
                  "vae_tiled": False}
  loader = data.LatentLoader(out, 2, process_index=0, process_count=1)
  assert loader.num_examples == len(PROMPTS) and loader.latent_shape == (4, 2, 2, 4)
  assert loader.metadata["vae"].endswith("v.pth") and loader.metadata["width"] == 32
