"""Training data: pre-encoded video latents and umT5 text embeddings.

T3-Video trains on cached inputs, as the paper does: every clip is encoded once by the
Wan VAE and every caption once by umT5-XXL, and training reads only those arrays. This module
writes such a cache and reads it back, with tensorflow-datasets' ArrayRecord format and without
TensorFlow.

On disk (one tfds dataset folder, split "train"):
    t3_latents-train.array_record-0000i-of-0000n   one shard per preparing process
    dataset_info.json, features.json                tfds metadata (written by `finalize_dataset`)
    metadata.json                                   how the data was prepared (size, frames, models)
    shard-0000i-of-0000n.json                       per-shard bookkeeping for `finalize_dataset`

Each example holds
    latents  float16 [C, F, H, W]   normalised VAE latents (what the DiT sees), raw bytes
    context  float16 [L, 4096]      umT5 output of the caption's L valid tokens only (L <= 512);
                                    the padded rows are zero in Wan and are re-created at read time
    caption  text                   the prompt
    source   text                   the video's `data_file` entry

Preparation (needs the Wan VAE and umT5-XXL, as Orbax folders written by convert_torch_weights.py,
and the tokenizer folder google/umt5-xxl/ of a Wan release):

    python -m t3_jax.training.data prepare --videos DIR --captions FILE.json --output OUT \\
        --vae VAE_CKPT --umt5 UMT5_CKPT --tokenizer TOKENIZER_DIR \\
        [--height 704 --width 1280 --frames 81] [--fps FPS] \\
        [--process-index i --process-count n] [--vae-tiled] [--skip-bad]

  FILE.json is in the 4K-VBench layout: a list of {"data_file": "vids/x.mp4", "prompt_en": "..."};
  `data_file` is relative to --videos. Each video is scaled to cover height x width, centre-cropped,
  and its first `frames` frames (4k+1; resampled to --fps if given) are scaled to [-1, 1] and
  encoded. With --process-count n, run n processes (e.g. one per GPU, CUDA_VISIBLE_DEVICES=i) with
  --process-index 0..n-1: each encodes every n-th video into its own shard, and the last one to
  finish writes the metadata (or run `python -m t3_jax.training.data finalize --output OUT`).

Training reads the folder with `LatentLoader` (a grain pipeline over the tfds ArrayRecord source:
per-epoch shuffle, one slice of every global batch per process, prefetch threads, a checkpointable
position); `SyntheticLoader` has the same interface and makes random data for smoke tests and
benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from t3_jax import cli
from t3_jax.logs import log

DATASET_NAME = "t3_latents"
SPLIT = "train"
TEXT_LEN = 512  # Wan's context length: umT5 output padded to 512 tokens.
FILE_FORMAT = "array_record"
# tfds' own ArrayRecord writer option: one record per chunk keeps random access cheap.
WRITER_OPTIONS = "group_size:1"

# encode_fn(video float32 [3, F, H, W] in [-1, 1]) -> latents [C, F', H', W'] (normalised).
EncodeFn = Callable[[np.ndarray], np.ndarray]
# text_fn(prompts) -> (context [n, L, D] float, lengths [n] int): valid tokens are context[i, :lengths[i]].
TextFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def _tfds():
  # Imported lazily: tensorflow_datasets takes about a second to import.
  import tensorflow_datasets as tfds

  return tfds


# ----------------------------------------------------------------------------------------------
# Captions and videos
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One clip to prepare: its `data_file` entry, resolved path and prompt."""

  source: str
  path: pathlib.Path
  prompt: str


def load_captions(captions_file: str | os.PathLike, videos_dir: str | os.PathLike) -> list[VideoItem]:
  """Reads a 4K-VBench-style captions JSON and checks that every listed video exists.

  Args:
    captions_file: a JSON list of {"data_file": path relative to videos_dir, "prompt_en": str}.
    videos_dir: the folder `data_file` paths are relative to.
  Returns:
    the items in file order.
  """
  captions_file, videos_dir = pathlib.Path(captions_file), pathlib.Path(videos_dir)
  if not captions_file.is_file():
    raise FileNotFoundError(f"Captions file {captions_file} not found: pass an existing --captions FILE.json.")
  if not videos_dir.is_dir():
    raise FileNotFoundError(f"Videos folder {videos_dir} not found: pass an existing --videos DIR.")
  try:
    entries = json.loads(captions_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{captions_file} is not valid JSON ({e}): expected a list of "
                     '{"data_file": ..., "prompt_en": ...}.') from None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"{captions_file} must hold a non-empty JSON list of "
                     '{"data_file": ..., "prompt_en": ...} objects.')
  items = []
  for i, entry in enumerate(entries):
    if not (isinstance(entry, dict) and isinstance(entry.get("data_file"), str) and entry["data_file"]
            and isinstance(entry.get("prompt_en"), str)):
      raise ValueError(f"{captions_file}: entry {i} ({str(entry)[:80]}) needs a non-empty string "
                       '"data_file" and a string "prompt_en".')
    items.append(VideoItem(entry["data_file"], videos_dir / entry["data_file"], entry["prompt_en"]))
  missing = [item.source for item in items if not item.path.is_file()]
  if missing:
    shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
    raise FileNotFoundError(f"{len(missing)} of {len(items)} videos listed in {captions_file} are missing "
                            f"under {videos_dir}: {shown} (data_file paths are relative to --videos).")
  return items


class _DropResizeWarning(logging.Filter):
  # imageio_ffmpeg warns whenever the output size differs from the source: here that is the point.
  def filter(self, record):
    return "is different from the source frame size" not in record.getMessage()


logging.getLogger("imageio_ffmpeg").addFilter(_DropResizeWarning())


def read_video(path: str | os.PathLike, height: int, width: int, frames: int,
               fps: float | None = None) -> np.ndarray:
  """Reads the first `frames` frames of a video, scaled to cover height x width and centre-cropped.

  ffmpeg does the work while decoding (bicubic scaling), so a 4K source never sits in memory.
  Args:
    fps: resample the clip to this frame rate first (None: the video's own frames).
  Returns:
    uint8 [frames, height, width, 3] RGB.
  """
  import imageio_ffmpeg

  filters = [f"fps={fps}"] if fps else []
  filters += [f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=bicubic",
              f"crop={width}:{height}"]
  reader = imageio_ffmpeg.read_frames(
      str(path), output_params=["-vf", ",".join(filters), "-frames:v", str(frames)])
  try:
    meta = next(reader)
    if tuple(meta["size"]) != (width, height):
      raise ValueError(f"{path}: ffmpeg produced {meta['size']} frames, expected {(width, height)}.")
    video = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
  except (OSError, RuntimeError) as e:
    raise ValueError(f"Could not decode video {path}: {str(e).splitlines()[0]}") from None
  finally:
    reader.close()
  if len(video) < frames:
    raise ValueError(f"Video {path} has {len(video)} frames{f' at {fps} fps' if fps else ''}, "
                     f"fewer than the {frames} requested: lower --frames or drop the clip (--skip-bad).")
  return np.stack(video)


def video_to_model_input(video: np.ndarray) -> np.ndarray:
  """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1], the layout Wan's VAE encodes."""
  return np.ascontiguousarray(video.transpose(3, 0, 1, 2), dtype=np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def make_features(latent_shape: Sequence[int], text_dim: int):
  """The tfds features of one example. float16 as raw bytes (otherwise tfds stores float32)."""
  tfds = _tfds()
  as_bytes = tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict({
      "latents": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float16, encoding=as_bytes),
      "context": tfds.features.Tensor(shape=(None, text_dim), dtype=np.float16, encoding=as_bytes),
      "caption": tfds.features.Text(),
      "source": tfds.features.Text(),
  })


def _shard_name(index: int, count: int) -> str:
  return f"{DATASET_NAME}-{SPLIT}.{FILE_FORMAT}-{index:05d}-of-{count:05d}"


def _shard_info_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.json"


def _new_shard_path(output_dir: pathlib.Path, process_index: int, process_count: int) -> pathlib.Path:
  shard_path = output_dir / _shard_name(process_index, process_count)
  for existing in (shard_path, output_dir / "dataset_info.json"):
    if existing.exists():
      raise FileExistsError(f"{existing} already exists: choose a new --output folder or delete it.")
  return shard_path


def _to_float16(x: np.ndarray, what: str, source: str) -> np.ndarray:
  x16 = np.asarray(x, dtype=np.float32).astype(np.float16)
  if not np.isfinite(x16).all():
    raise ValueError(f"{source}: {what} hold values that are not finite in float16 (|x| > 65504 or NaN); "
                     "check the encoder's output.")
  return x16


def _check_prepare(output_dir: pathlib.Path, height: int, width: int, frames: int, process_index: int,
                   process_count: int) -> pathlib.Path:
  """The arguments of `prepare_dataset`, checked before any model loads; returns this
  process's new shard path."""
  if frames < 1 or frames % 4 != 1:
    raise ValueError(f"frames={frames} must be 4k+1 (e.g. 81): the Wan VAE compresses time by 4.")
  if height <= 0 or width <= 0 or height % 16 or width % 16:
    raise ValueError(f"height={height}, width={width} must be positive multiples of 16 (VAE stride x patch).")
  _default_process(process_index, process_count)  # the range check
  return _new_shard_path(output_dir, process_index, process_count)


def prepare_dataset(items: Sequence[VideoItem], output_dir: str | os.PathLike, encode_fn: EncodeFn,
                    text_fn: TextFn, *, height: int = 704, width: int = 1280, frames: int = 81,
                    fps: float | None = None, process_index: int = 0, process_count: int = 1,
                    text_batch_size: int = 8, skip_bad: bool = False,
                    metadata: dict[str, Any] | None = None, progress: bool = True) -> pathlib.Path:
  """Encodes this process's share of `items` (items[process_index::process_count]) into one shard.

  The process that completes the last shard also writes the dataset metadata (`finalize_dataset`).
  Args:
    encode_fn: video float32 [3, frames, height, width] in [-1, 1] -> normalised latents [C, F, H, W].
    text_fn: prompts -> (context [n, L, D], lengths [n]).
    skip_bad: log and skip videos that cannot be decoded or are too short, instead of raising.
    metadata: extra JSON-able facts saved in metadata.json (e.g. checkpoint paths).
  Returns:
    the path of the shard written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  import tqdm

  output_dir = pathlib.Path(output_dir)
  shard_path = _check_prepare(output_dir, height, width, frames, process_index, process_count)
  output_dir.mkdir(parents=True, exist_ok=True)

  mine = list(items[process_index::process_count])
  writer = ArrayRecordWriter(os.fspath(shard_path), WRITER_OPTIONS)
  features, latent_shape, text_dim, skipped, written = None, None, None, [], 0
  try:
    with tqdm.tqdm(total=len(mine), desc=f"shard {process_index + 1}/{process_count}", unit="video",
                   disable=not progress) as bar:
      for start in range(0, len(mine), text_batch_size):
        chunk = mine[start:start + text_batch_size]
        context, lengths = text_fn([item.prompt for item in chunk])
        for item, item_context, length in zip(chunk, np.asarray(context), np.asarray(lengths)):
          try:
            video = read_video(item.path, height, width, frames, fps)
          except ValueError as e:
            if not skip_bad:
              raise
            log.warning("Skipping %s: %s", item.source, e)
            skipped.append(item.source)
            bar.update()
            continue
          latents = _to_float16(encode_fn(video_to_model_input(video)), "latents", item.source)
          example = {"latents": latents,
                     "context": _to_float16(item_context[:int(length)], "context", item.source),
                     "caption": item.prompt, "source": item.source}
          if features is None:  # the latent shape is known once the first clip is encoded
            latent_shape, text_dim = latents.shape, example["context"].shape[-1]
            features = make_features(latent_shape, text_dim)
          writer.write(features.serialize_example(example))
          written += 1
          bar.update()
  finally:
    writer.close()

  info = {"num_examples": written, "num_bytes": shard_path.stat().st_size,
          "latent_shape": list(latent_shape) if latent_shape else None, "text_dim": text_dim,
          "skipped": skipped,
          "metadata": {"height": height, "width": width, "frames": frames, "fps": fps,
                       "text_len": TEXT_LEN, "latents": "normalised", **(metadata or {})}}
  info_path = output_dir / _shard_info_name(process_index, process_count)
  tmp = info_path.with_suffix(".tmp")
  tmp.write_text(json.dumps(info, indent=1))
  tmp.rename(info_path)  # atomic: finalize never sees half a file
  log.info("Wrote %d examples to %s (%d skipped).", written, shard_path, len(skipped))

  done = [output_dir / _shard_info_name(i, process_count) for i in range(process_count)]
  if all(p.exists() for p in done):
    try:  # Exactly one process wins the lock and finalizes.
      os.close(os.open(output_dir / ".finalize.lock", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
      return shard_path
    finalize_dataset(output_dir)
  return shard_path


def finalize_dataset(output_dir: str | os.PathLike) -> None:
  """Writes the tfds metadata once every shard of a `prepare_dataset` run is complete."""
  tfds = _tfds()
  output_dir = pathlib.Path(output_dir)
  infos = sorted(output_dir.glob("shard-*-of-*.json"))
  if not infos:
    raise FileNotFoundError(f"No shard-*.json in {output_dir}: run `python -m t3_jax.training.data prepare` first.")
  count = int(infos[0].stem.split("-of-")[1])
  expected = [output_dir / _shard_info_name(i, count) for i in range(count)]
  missing = [p.name for p in expected if not p.exists()]
  if missing or len(infos) != count:
    raise FileNotFoundError(f"{output_dir}: shards not all complete (missing {', '.join(missing)}); "
                            "wait for every --process-index to finish.")
  shards = [json.loads(p.read_text()) for p in expected]
  full = [s for s in shards if s["num_examples"]]
  if not full:
    raise ValueError(f"{output_dir}: no example was written (all videos skipped?).")
  shapes = {(tuple(s["latent_shape"]), s["text_dim"]) for s in full}
  if len(shapes) != 1:
    raise ValueError(f"{output_dir}: shards disagree on (latent shape, text dim): {sorted(shapes)}; "
                     "prepare them with the same --height/--width/--frames and models.")
  (latent_shape, text_dim), = shapes
  metadata = dict(full[0]["metadata"], skipped=[s for shard in shards for s in shard["skipped"]])
  split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[s["num_examples"] for s in shards],
                              num_bytes=sum(s["num_bytes"] for s in shards))
  tfds.folder_dataset.write_metadata(
      data_dir=output_dir, features=make_features(latent_shape, text_dim), split_infos=[split],
      check_data=False,  # the check reads through TensorFlow
      disable_shuffling=True, description="T3-Video training cache: Wan VAE latents + umT5 context.",
      metadata=tfds.core.MetadataDict(metadata))
  log.info("Dataset %s: %d examples, latents %s.", output_dir, split.num_examples, latent_shape)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
  return process_index, process_count


class _GrainLoader:
  """Infinite iterator over this process's numpy batches: a grain pipeline indexed by global step.

  Global step s is a batch of G = `batch_size_per_process * process_count` example ids; this
  process reads rows [process_index * b, (process_index + 1) * b) of it. The ids are a pure
  function of (seed, s), so a resume is exact, even on another number of processes with the same
  global batch. grain's threads read `prefetch` batches ahead; the iterator's grain state (its
  next step) is what `get_state` returns for the checkpoint. Subclasses give `_global_ids()`
  (a grain.MapDataset of int64 [G] id arrays, one per global step) and `_load(ids)`.
  """

  def __init__(self, batch_size_per_process: int, seed: int, process_index: int | None,
               process_count: int | None, prefetch: int):
    import grain

    if batch_size_per_process < 1:
      raise ValueError(f"batch_size_per_process={batch_size_per_process} must be >= 1.")
    if not 0 <= int(seed) < 2**32:
      raise ValueError(f"seed={seed} must lie in [0, 2**32) (grain's shuffle seed).")
    self.batch_size_per_process = batch_size_per_process
    self.seed = int(seed)
    self.process_index, self.process_count = _default_process(process_index, process_count)
    self.global_batch_size = batch_size_per_process * self.process_count
    rows = slice(self.process_index * batch_size_per_process, (self.process_index + 1) * batch_size_per_process)
    # Ids are cheap: the global batch is sliced before anything is read.
    self.dataset = self._global_ids().map(lambda ids: ids[rows]).map(self._load)
    options = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(0, prefetch))
    self._iterator = iter(self.dataset.to_iter_dataset(options))

  def _global_ids(self):
    raise NotImplementedError

  def _load(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch of global step `step` (does not move the iterator)."""
    return self.dataset[int(step)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def _state_fields(self) -> dict[str, int]:
    return {"seed": self.seed, "global_batch_size": self.global_batch_size}

  def get_state(self) -> dict[str, int]:
    """JSON-able position: the next global step (grain's next_index), plus what must match to
    resume the same sequence."""
    return {"step": int(self._iterator.get_state()["next_index"]), **self._state_fields()}

  def set_state(self, state: Mapping[str, int] | int) -> None:
    """Continues from `get_state()`'s result (or from a bare step number)."""
    if isinstance(state, Mapping):
      for key, value in self._state_fields().items():
        if key in state and int(state[key]) != value:
          raise ValueError(f"Loader state has {key}={state[key]} but this loader has {value}: "
                           f"resume with the same {key} to continue the same sequence.")
      state = state["step"]
    step = int(state)
    if step < 0:
      raise ValueError(f"Loader step {step} must be >= 0.")
    self._iterator.set_state({"next_index": step})  # drops the batches read ahead

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class LatentLoader(_GrainLoader):
  """Reads a prepared dataset (tfds ArrayRecord source, through grain), shuffled by epoch, one
  disjoint slice per process.

  Each epoch is a permutation of all examples (grain's index shuffle, seeded by seed and epoch);
  global step s reads positions [k * G, (k + 1) * G) of epoch s // steps_per_epoch's permutation
  (k = s mod steps_per_epoch, G = global batch size), dropping the last N mod G examples of each
  epoch. Within an epoch the processes' examples are disjoint and cover N - N mod G examples.

  Yields dicts of numpy arrays (b = batch_size_per_process):
    latents          float32 [b, C, F, H, W]
    context          float32 [b, text_len, D]   zero beyond each caption's length, as Wan pads it
    context_lengths  int32   [b]                valid context tokens
    index            int64   [b]                example indices in the dataset (for logging)
  """

  def __init__(self, path: str | os.PathLike, batch_size_per_process: int, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None, *,
               text_len: int = TEXT_LEN, dtype: Any = np.float32, prefetch: int = 2):
    tfds = _tfds()
    path = pathlib.Path(path)
    if not (path / "dataset_info.json").is_file():
      raise FileNotFoundError(f"{path} holds no prepared dataset (dataset_info.json missing): run "
                              "`python -m t3_jax.training.data prepare` (or `finalize`) first.")
    builder = tfds.builder_from_directory(os.fspath(path))
    self.source = builder.as_data_source(split=SPLIT)
    self.metadata = dict(builder.info.metadata or {})
    self.latent_shape = tuple(builder.info.features["latents"].shape)
    self.text_dim = builder.info.features["context"].shape[-1]
    self.text_len, self.dtype = text_len, np.dtype(dtype)
    self.num_examples = len(self.source)
    global_batch = batch_size_per_process * _default_process(process_index, process_count)[1]
    self.steps_per_epoch = self.num_examples // global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"{path} holds {self.num_examples} examples, fewer than one global batch of "
                       f"{global_batch} ({batch_size_per_process} per process): lower the batch size or "
                       "prepare more data.")
    super().__init__(batch_size_per_process, seed, process_index, process_count, prefetch)

  def _global_ids(self):
    import grain

    used = self.steps_per_epoch * self.global_batch_size
    # One epoch of global batches (the slice drops the last N mod G); repeat() reseeds the
    # shuffle for every epoch.
    return (grain.MapDataset.range(self.num_examples).shuffle(seed=self.seed)[:used]
            .batch(self.global_batch_size, batch_fn=lambda ids: np.asarray(ids, np.int64)).repeat())

  def _state_fields(self) -> dict[str, int]:
    return {**super()._state_fields(), "num_examples": self.num_examples}

  def _load(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    examples = self.source.__getitems__([int(i) for i in ids])
    b = len(ids)
    batch = {"latents": np.empty((b, *self.latent_shape), self.dtype),
             "context": np.zeros((b, self.text_len, self.text_dim), self.dtype),
             "context_lengths": np.empty((b,), np.int32),
             "index": np.asarray(ids, np.int64)}
    for j, example in enumerate(examples):
      context = example["context"][:self.text_len]
      batch["latents"][j] = example["latents"]
      batch["context"][j, :len(context)] = context
      batch["context_lengths"][j] = len(context)
    return batch

  def example(self, index: int) -> dict[str, Any]:
    """One stored example as written (float16 arrays, caption and source as str)."""
    example = self.source[int(index)]
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}


class SyntheticLoader(_GrainLoader):
  """Random batches in `LatentLoader`'s format, for smoke tests and benchmarks.

  Example i of the global sequence is drawn from (seed, i) alone, so batches are reproducible
  after `set_state` and independent of the process count. Context lengths are uniform in
  [1, text_len] and the context is zero beyond them.
  """

  def __init__(self, latent_shape: Sequence[int], batch_size_per_process: int, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None, *,
               text_len: int = TEXT_LEN, text_dim: int = 4096, dtype: Any = np.float32,
               prefetch: int = 2):
    self.latent_shape, self.text_len, self.text_dim = tuple(latent_shape), text_len, text_dim
    self.dtype = np.dtype(dtype)
    self.steps_per_epoch = None  # endless
    self.metadata = {"synthetic": True}
    super().__init__(batch_size_per_process, seed, process_index, process_count, prefetch)

  def _global_ids(self):
    import grain

    g = self.global_batch_size
    return grain.MapDataset.range(sys.maxsize // g).map(lambda s: np.arange(s * g, (s + 1) * g, dtype=np.int64))

  def _load(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    b = len(ids)
    batch = {"latents": np.empty((b, *self.latent_shape), self.dtype),
             "context": np.zeros((b, self.text_len, self.text_dim), self.dtype),
             "context_lengths": np.empty((b,), np.int32), "index": ids}
    for j, i in enumerate(ids):
      rng = np.random.default_rng([self.seed, int(i)])
      length = int(rng.integers(1, self.text_len + 1))
      batch["latents"][j] = rng.standard_normal(self.latent_shape, np.float32)
      batch["context"][j, :length] = rng.standard_normal((length, self.text_dim), np.float32)
      batch["context_lengths"][j] = length
    return batch


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _model_encoders(vae_path: str, umt5_path: str, tokenizer_dir: str, *, text_batch_size: int,
                    vae_tiled: bool) -> tuple[EncodeFn, TextFn]:
  """The real encoders from t3_jax's JAX ports: Wan VAE (normalised latents) and umT5-XXL.

  Both checkpoints are Orbax folders written by convert_torch_weights.py.
  """
  import jax.numpy as jnp

  from t3_jax.models import umt5
  from t3_jax.models import vae

  for flag, p in (("--vae", vae_path), ("--umt5", umt5_path), ("--tokenizer", tokenizer_dir)):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{flag} {p} not found.")
  tokenizer = umt5.UMT5Tokenizer.from_dir(tokenizer_dir)
  text_model = umt5.load_umt5(umt5_path)
  vae_model = vae.load_vae(vae_path)

  def encode_fn(video: np.ndarray) -> np.ndarray:
    mean = vae_model.encode(jnp.asarray(video[None]), tiled=vae_tiled)  # posterior mean [1, C, F, H, W]
    return np.asarray(vae_model.normalize_latents(mean.astype(jnp.float32)))[0]

  def text_fn(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # Padded to a fixed batch so that the last, smaller chunk does not compile umT5 again.
    padded = [umt5.clean_prompt(p) for p in prompts] + [""] * (text_batch_size - len(prompts))
    ids, mask = tokenizer(padded, TEXT_LEN)
    context = umt5.encode_tokens(text_model, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(context, np.float32)[:len(prompts)], mask.sum(1)[:len(prompts)]

  return encode_fn, text_fn


def main(argv: Iterable[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m t3_jax.training.data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser("prepare", help="encode videos and captions into a training cache")
  prep.add_argument("--videos", required=True, help="folder that captions' data_file paths are relative to")
  prep.add_argument("--captions", required=True, help='JSON list of {"data_file", "prompt_en"}')
  prep.add_argument("--output", required=True, help="dataset folder to create")
  prep.add_argument("--vae", required=True, help="Wan VAE checkpoint (converted Orbax folder)")
  prep.add_argument("--umt5", required=True, help="umT5-XXL encoder checkpoint (converted Orbax folder)")
  prep.add_argument("--tokenizer", required=True, help="umT5 tokenizer folder (google/umt5-xxl)")
  prep.add_argument("--height", type=int, default=704)
  prep.add_argument("--width", type=int, default=1280)
  prep.add_argument("--frames", type=int, default=81, help="4k+1 frames per clip")
  prep.add_argument("--fps", type=float, default=None, help="resample clips to this rate (default: native)")
  prep.add_argument("--process-index", type=int, default=0)
  prep.add_argument("--process-count", type=int, default=1)
  prep.add_argument("--text-batch-size", type=int, default=8)
  prep.add_argument("--vae-tiled", action="store_true", help="encode in spatial tiles (for 4K clips)")
  prep.add_argument("--skip-bad", action="store_true", help="skip undecodable or too short videos")
  fin = commands.add_parser("finalize", help="write the metadata of a multi-process prepare")
  fin.add_argument("--output", required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

  if args.command == "finalize":
    finalize_dataset(args.output)
    return
  items = load_captions(args.captions, args.videos)
  _check_prepare(pathlib.Path(args.output), args.height, args.width, args.frames, args.process_index,
                 args.process_count)  # fail before loading models
  encode_fn, text_fn = _model_encoders(args.vae, args.umt5, args.tokenizer,
                                       text_batch_size=args.text_batch_size, vae_tiled=args.vae_tiled)
  prepare_dataset(items, args.output, encode_fn, text_fn, height=args.height, width=args.width,
                  frames=args.frames, fps=args.fps, process_index=args.process_index,
                  process_count=args.process_count, text_batch_size=args.text_batch_size,
                  skip_bad=args.skip_bad,
                  metadata={"vae": os.path.abspath(args.vae), "umt5": os.path.abspath(args.umt5),
                            "captions": os.path.abspath(args.captions)})


if __name__ == "__main__":
  try:
    main()
  except cli.USER_ERRORS as e:  # a missing video or model, a bad size, an existing output
    cli.fail(e)
