"""The weights engine: one way to convert, validate, load and random-init every model.

A model module declares a `ModelWeights`: its config type, how to build the module, and
its torch layouts as tables of rules,

  (torch key pattern, param path, transform name)

  - the pattern may hold "{i}": the param then has a leading layer axis [num_layers, ...]
    and layer i is filled from that key; "a|b": the first of the keys present is used
    (the other, when present, is skipped as a tied copy);
  - the path is "/"-separated in the nested param dict (list indices as numbers);
  - the transform is a name in TRANSFORMS (torch layout -> ours).

and how to read its config: `fields_from_json` (a source's config.json, as diffusers and
Wan releases ship it) and `fields_from_shapes` (the tensor shapes). Fields that no shape
shows (a DiT's head count) come from config.json, a flag, or a preset whose shapes match:
never from a guess. The engine does the rest: finds the layout, resolves the config,
checks every key and shape before reading a tensor, fills the param tree one tensor at a
time, restores checkpoints straight into the abstract model, and draws random params.

To read a new torch naming of a model, add a Layout (its rules and signature keys) to the
model's WEIGHTS.layouts; to add a model, declare its WEIGHTS and name its module in
t3_jax.weights.convert.KINDS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t3_jax.logs import log
from t3_jax.weights import checkpoint as checkpoint_lib
from t3_jax.weights.sources import (Shape, StateDictSource, TensorSource, WeightsError,  # noqa: F401
                                    open_source, strip_prefixes)


Rule = tuple[str, str, str]  # (torch key pattern, param path, transform name)


# ----------------------------------------------------------------------- transforms
# Written with .T / .reshape / .transpose only, so that they run on numpy arrays and on
# shapes (jax.eval_shape: the checks before any tensor is read).

TRANSFORMS: dict[str, Callable] = {
    "identity": lambda w: w,
    "transpose": lambda w: w.T,                                        # Linear (out, in) -> kernel (in, out)
    "conv_as_linear": lambda w: w.reshape(w.shape[0], -1).T,           # Conv3d with kernel == stride
    "conv1x1_as_linear": lambda w: w.reshape(w.shape[0], w.shape[1]).T,  # 1x1 Conv2d (out, in, 1, 1)
    "conv3d": lambda w: w.transpose(2, 3, 4, 1, 0),   # (out, in, kt, kh, kw) -> (kt, kh, kw, in, out)
    "conv2d": lambda w: w.transpose(2, 3, 1, 0),      # (out, in, kh, kw) -> (kh, kw, in, out)
    "vector": lambda w: w.reshape(-1),                # biases, gammas stored as (C, 1, 1[, 1])
}

# Inverses on shapes, where simple: they let errors name the shape a tensor should have.
_SOURCE_SHAPE = {"identity": lambda shape: shape, "transpose": lambda shape: shape[::-1]}


def dense(key: str, path: str, bias: bool = True) -> list[Rule]:
  """A torch Linear `key.{weight,bias}` -> an nnx.Linear `path/{kernel,bias}`."""
  rules = [(f"{key}.weight", f"{path}/kernel", "transpose")]
  return rules + [(f"{key}.bias", f"{path}/bias", "identity")] if bias else rules


# ------------------------------------------------------------------- nested dicts

def flatten(tree: Mapping) -> dict[tuple, Any]:
  """{(key, ...): leaf} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update({(key, *sub): leaf for sub, leaf in flatten(value).items()})
    else:
      flat[(key,)] = value
  return flat


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def path_name(path: tuple) -> str:
  return "/".join(map(str, path))


# ------------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class Layout:
  """One torch naming of a model's tensors."""
  rules: Sequence[Rule] | Callable[[Any], Sequence[Rule]]  # or config -> rules
  signature: tuple[str, ...]       # keys that mark a checkpoint as this layout
  ignored: tuple[str, ...] = ()    # key prefixes a checkpoint may hold that the model does not use


@dataclasses.dataclass(frozen=True)
class ModelWeights:
  """What the engine needs to know of a model (declared beside it, e.g. dit.WEIGHTS)."""
  kind: str                        # config.json "kind" of its checkpoints: "dit", "vae", "umt5"
  name: str                        # for messages: "Wan DiT"
  config_type: type                # dataclass with to_dict() / from_dict()
  build: Callable[..., nnx.Module]  # build(config, *, param_dtype, rngs, **kwargs)
  layouts: Mapping[str, Layout]
  fields_from_shapes: Callable[[Mapping[str, Shape], str], dict]   # (shapes, layout) -> config fields
  from_fields: Callable[[dict], Any]                               # fields -> config (derives the rest)
  fields_from_json: Callable[[dict], dict | None] = lambda config: None  # None: not this model's config.json
  presets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  unseen: Mapping[str, str] = dataclasses.field(default_factory=dict)  # field -> flag that gives it
  checkpoint_config: Callable[[Any], dict] = lambda config: config.to_dict()
  make_hint: str = ""              # how to make a checkpoint of this kind
  short_name: str = ""             # for messages about our own checkpoints: "DiT" (default: name)


@dataclasses.dataclass(frozen=True)
class Detected:
  layout: str                      # e.g. "original", "diffusers", "wan", "hf"
  config: Any                      # the model's config object (DiTConfig, VAEConfig, UMT5Config)
  preset: str | None = None        # the preset it equals, if any
  from_json: bool = False          # whether the source's config.json described it


class NotThisKind(WeightsError):
  """The tensors are not this model's (the caller may name the kind they look like)."""


def _plain(value):
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _config_fields(config) -> dict:
  return {k: _plain(v) for k, v in config.to_dict().items()}


def layout_score(spec: ModelWeights, keys: Iterable[str]) -> tuple[str | None, int]:
  """(the layout with most signature keys among `keys`, how many), or (None, 0)."""
  keys = set(keys)
  hits = {name: sum(k in keys for k in layout.signature) for name, layout in spec.layouts.items()}
  best = max(hits, key=hits.get)
  return (best, hits[best]) if hits[best] else (None, 0)


def detect(spec: ModelWeights, shapes: Mapping[str, Shape], *, source_config: dict | None = None,
           preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> Detected:
  """The layout and config of `shapes` ({clean torch key: shape}).

  The config comes from, in order: `overrides` (flags), the source's config.json, the
  shapes; a field no shape shows (spec.unseen) from there, or else from the preset
  (`preset`, or the one whose shapes match). Conflicts between them are errors.
  """
  layout, _ = layout_score(spec, shapes)
  if layout is None:
    raise NotThisKind(f"not a {spec.name} checkpoint: none of its {len(shapes)} tensors (e.g. "
                      f"{', '.join(sorted(shapes)[:3])}) has a {spec.name} name")
  if preset is not None and preset not in spec.presets:
    raise WeightsError(f"unknown --model {preset!r}: choose one of {', '.join(spec.presets)}")
  try:
    found = {k: _plain(v) for k, v in spec.fields_from_shapes(shapes, layout).items()}
  except WeightsError:
    raise
  except (ValueError, KeyError, IndexError) as e:
    raise NotThisKind(f"not a {spec.name} checkpoint: {e}") from None
  fields = dict(found)
  json_fields = spec.fields_from_json(source_config) if source_config else None
  if json_fields is not None:
    json_fields = {k: _plain(v) for k, v in json_fields.items()}
    if clash := [k for k in json_fields.keys() & found.keys() if json_fields[k] != found[k]]:
      raise WeightsError("the source's config.json does not describe its weights: " + ", ".join(
          f"{k} {json_fields[k]} in config.json, {found[k]} in the weights" for k in sorted(clash)))
    fields.update(json_fields)
  for key, value in (overrides or {}).items():
    if value is None:
      continue
    if json_fields is not None and key in json_fields and json_fields[key] != value:
      raise WeightsError(f"{spec.unseen.get(key, key)} {value} contradicts the source's config.json "
                         f"({key} {json_fields[key]}): drop the flag")
    fields[key] = value

  if preset is not None:
    ours = _config_fields(spec.presets[preset])
    if diff := [k for k in fields if k in ours and ours[k] != fields[k]]:
      raise WeightsError(f"the checkpoint is not {preset}: " + ", ".join(
          f"{k} {fields[k]} (preset {ours[k]})" for k in diff))
    fields = {**ours, **fields}
  elif missing := [k for k in spec.unseen if k not in fields]:
    matches = [name for name, config in spec.presets.items()
               if all(_config_fields(config).get(k) == v for k, v in fields.items())]
    if not matches:
      shown = ", ".join(f"{k} {v}" for k, v in found.items())
      flags = " and ".join(f"{spec.unseen[k]} N" for k in missing)
      raise WeightsError(f"the weights ({shown}) match no {spec.name} preset and do not show its "
                         f"{', '.join(missing)}: pass {flags}, or convert the exported folder with its config.json")
    fields = {**_config_fields(spec.presets[matches[0]]), **fields}
  try:
    config = spec.from_fields(fields)
  except (ValueError, TypeError) as e:
    raise WeightsError(f"not a valid {spec.name} config ({e}): check the source's config.json and the flags") from None
  name = next((n for n, c in spec.presets.items() if c == config), None)
  return Detected(layout=layout, config=config, preset=name, from_json=json_fields is not None)


def resolve_rules(spec: ModelWeights, layout: str, config, keys: Iterable[str]) -> tuple[list[Rule], list[str]]:
  """(rules with each "a|b" replaced by the key present, keys of `keys` the model does not use)."""
  keys = set(keys)
  table = spec.layouts[layout].rules
  table = table(config) if callable(table) else table
  rules, skipped = [], set()
  for pattern, path, transform in table:
    alternatives = pattern.split("|")
    chosen = next((a for a in alternatives if a.format(i=0) in keys), alternatives[0])
    skipped.update(a for a in alternatives if a != chosen)
    rules.append((chosen, path, transform))
  prefixes = spec.layouts[layout].ignored
  ignored = sorted(k for k in keys if k in skipped or (prefixes and k.startswith(prefixes)))
  return rules, ignored


# ------------------------------------------------------------------------ targets

def abstract_model(spec: ModelWeights, config, *, param_dtype=jnp.float32, **kwargs) -> nnx.Module:
  """The model with ShapeDtypeStruct params (nothing allocated)."""
  return nnx.eval_shape(lambda: spec.build(config, param_dtype=param_dtype, rngs=nnx.Rngs(0), **kwargs))


def param_structs(spec: ModelWeights, config, param_dtype=jnp.float32) -> dict:
  """The model's param tree as nested ShapeDtypeStructs."""
  return nnx.to_pure_dict(nnx.state(abstract_model(spec, config, param_dtype=param_dtype), nnx.Param))


@dataclasses.dataclass(frozen=True)
class Slot:
  path: tuple         # the param's path in the tree
  layer: int | None   # index along the stacked layer axis, or None
  transform: str
  shape: Shape        # the slot's shape (without the layer axis)


def _shape_after(transform: str, shape: Shape) -> Shape | None:
  try:
    return tuple(jax.eval_shape(TRANSFORMS[transform], jax.ShapeDtypeStruct(shape, jnp.float32)).shape)
  except Exception:
    return None


def _list(items: Sequence[str], limit: int = 8) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def plan(rules: Sequence[Rule], target: Mapping[tuple, jax.ShapeDtypeStruct],
         shapes: Mapping[str, Shape], what: str) -> dict[str, Slot]:
  """{torch key: Slot}; raises one WeightsError naming every missing, unexpected and
  mis-shaped tensor. `target`: {param path tuple: ShapeDtypeStruct}."""
  by_name = {path_name(path): path for path in target}
  slots: dict[str, Slot] = {}
  covered = set()
  for key, name, transform in rules:
    path = by_name[name]
    leaf = target[path]
    covered.add(path)
    if "{i}" in key:
      for i in range(leaf.shape[0]):
        slots[key.format(i=i)] = Slot(path, i, transform, tuple(leaf.shape[1:]))
    else:
      slots[key] = Slot(path, None, transform, tuple(leaf.shape))
  assert covered == set(target), f"the rules leave params unfilled: {sorted(map(path_name, set(target) - covered))}"

  missing = sorted(k for k in slots if k not in shapes)
  unexpected = sorted(k for k in shapes if k not in slots)
  misshaped = []
  for key, slot in slots.items():
    if key in shapes and _shape_after(slot.transform, tuple(shapes[key])) != slot.shape:
      inverse = _SOURCE_SHAPE.get(slot.transform)
      wanted = f"expected {inverse(slot.shape)}" if inverse else f"does not fit {path_name(slot.path)} {slot.shape}"
      misshaped.append(f"{key} is {tuple(shapes[key])}, {wanted}")
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_list(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {_list(unexpected)}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped: {_list(misshaped)}")
  if problems:
    raise WeightsError(f"the checkpoint does not match {what}: " + "; ".join(problems))
  return slots


# ---------------------------------------------------------------------- conversion

def stored_dtype(dtypes: Iterable[str]) -> np.dtype:
  """The dtype a checkpoint stores its floating tensors in (float32 when they are mixed)."""
  floating = {d for d in dtypes if d in ("float16", "bfloat16", "float32", "float64")}
  if len(floating) == 1 and floating != {"float64"}:
    return np.dtype(jnp.dtype(floating.pop()))
  return np.dtype(np.float32)


def convert_source(spec: ModelWeights, source: TensorSource, *, dtype=None, preset: str | None = None,
                   overrides: Mapping[str, Any] | None = None, progress: bool = False) -> tuple[dict, Detected]:
  """(nested numpy param dict, Detected) of a torch source; dtype None keeps the stored one."""
  raw_key = strip_prefixes(source.shapes)
  shapes = {k: tuple(source.shapes[raw]) for k, raw in raw_key.items()}
  detected = detect(spec, shapes, source_config=source.config, preset=preset, overrides=overrides)
  rules, ignored = resolve_rules(spec, detected.layout, detected.config, shapes)
  if ignored:
    log.warning("skipping %d tensors the %s does not use (e.g. %s)", len(ignored), spec.name, ignored[0])
    skipped = set(ignored)
    shapes = {k: v for k, v in shapes.items() if k not in skipped}
  if dtype is None:
    dtype = stored_dtype(source.dtypes[raw_key[k]] for k in shapes)
  dtype = np.dtype(dtype)
  target = flatten(param_structs(spec, detected.config, dtype))
  what = f"a {detected.preset or spec.name} ({detected.layout} layout)"
  slots = plan(rules, target, shapes, what)

  arrays = {path: np.empty(leaf.shape, dtype) for path, leaf in target.items()}
  from tqdm import tqdm
  for key, slot in tqdm(sorted(slots.items()), desc=f"converting {spec.kind}", unit="tensor",
                        disable=not progress):
    value = TRANSFORMS[slot.transform](source.read(raw_key[key]))
    if slot.layer is None:
      arrays[slot.path][...] = value
    else:
      arrays[slot.path][slot.layer] = value
  return unflatten(arrays), detected


def convert_state_dict(spec: ModelWeights, state_dict: Mapping[str, Any], **kwargs) -> tuple[dict, Detected]:
  """convert_source for a state dict in memory ({key: torch tensor or array})."""
  return convert_source(spec, StateDictSource(state_dict), **kwargs)


# ------------------------------------------------------------------------ modules

def from_params(spec: ModelWeights, config, params: Mapping, *, param_dtype=None, **kwargs) -> nnx.Module:
  """The model holding `params` (a nested dict of arrays in our structure), cast to
  param_dtype (None: the params' own dtype). Structure and shapes are checked."""
  if param_dtype is None:
    param_dtype = stored_dtype(str(np.asarray(leaf).dtype) for leaf in jax.tree.leaves(params))
  graphdef, state = nnx.split(abstract_model(spec, config, param_dtype=param_dtype, **kwargs))
  like = flatten(nnx.to_pure_dict(state))
  given = {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path): leaf
           for path, leaf in flatten(params).items()}
  bad = sorted(path_name(p) for p in like.keys() | given.keys()
               if p not in like or p not in given or tuple(like[p].shape) != tuple(np.shape(given[p])))
  if bad:
    p = next(path for path in like.keys() | given.keys() if path_name(path) == bad[0])
    raise WeightsError(f"params do not fit the {spec.name} of {config}: {bad[0]} is "
                       f"{tuple(np.shape(given[p])) if p in given else 'missing'}, expected "
                       f"{tuple(like[p].shape) if p in like else 'nothing'} ({len(bad)} mismatches); check the config")
  nnx.replace_by_pure_dict(state, unflatten({p: jnp.asarray(given[p], like[p].dtype) for p in like}))
  return nnx.merge(graphdef, state)


def read_config(spec: ModelWeights, ckpt_dir: str) -> dict:
  """The config.json of a t3-jax checkpoint of spec.kind; errors name the converter command."""
  try:
    stored = checkpoint_lib.read_config(ckpt_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; to make a {spec.short_name or spec.name} checkpoint, {spec.make_hint}") from None
  if stored.get("kind") != spec.kind:
    raise ValueError(f"{ckpt_dir} holds a {stored.get('kind')!r} checkpoint, not a {spec.short_name or spec.name} "
                     f"({spec.kind!r}); to make one, {spec.make_hint}")
  return stored


def restore_params(spec: ModelWeights, ckpt_dir: str, target: Mapping) -> tuple[dict, dict]:
  """(params, config.json) of a checkpoint of spec.kind, restored by Orbax straight into
  `target` (ShapeDtypeStructs: their dtypes and shardings; Orbax casts as it reads, so
  there is no second copy of the params on the host)."""
  stored = read_config(spec, ckpt_dir)
  params, _ = checkpoint_lib.load_checkpoint(ckpt_dir, target)
  return params, stored


def load(spec: ModelWeights, ckpt_dir: str, *, param_dtype=None, **kwargs) -> nnx.Module:
  """The model of a t3-jax checkpoint of spec.kind: the abstract model is built once and
  the params are restored straight into it, in param_dtype (None: the dtype stored).
  kwargs go to spec.build (compute dtype, attention, ...)."""
  stored = read_config(spec, ckpt_dir)
  config = spec.config_type.from_dict(stored)
  param_dtype = jnp.dtype(stored.get("dtype", "float32") if param_dtype is None else param_dtype)
  graphdef, state = nnx.split(abstract_model(spec, config, param_dtype=param_dtype, **kwargs))
  params, _ = restore_params(spec, ckpt_dir, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def save(spec: ModelWeights, directory: str, model: nnx.Module, overwrite: bool = False, **extra) -> str:
  """Writes a model's params and config as a t3-jax checkpoint (atomically)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  dtypes = {str(np.dtype(leaf.dtype)) for leaf in jax.tree.leaves(params)}
  config = {"kind": spec.kind, **spec.checkpoint_config(model.config), "dtype": stored_dtype(dtypes).name, **extra}
  return checkpoint_lib.save_checkpoint(directory, params, config, overwrite=overwrite)


# -------------------------------------------------------------------- random init

def _draw_rule(name: str, shape: Sequence[int]):
  """How a standard-normal draw becomes a parameter of this name and shape (see
  random_params); the same function serves NumPy (host) and jax.numpy (device) arrays."""
  if name == "kernel":
    fan_in = math.prod(shape[:-1]) if len(shape) >= 4 else shape[-2]
    return lambda x: x / math.sqrt(fan_in)
  if name in ("scale", "gamma"):
    return lambda x: 1.0 + 0.1 * x
  if name == "modulation":
    return lambda x: x / math.sqrt(shape[-1])
  if name == "bias":
    return lambda x: 0.02 * x
  if name == "relative_attention_bias":
    return lambda x: 0.1 * x
  return lambda x: x


# Parameters smaller than this share one random draw (sliced): each separate draw is its own
# piece of XLA program to compile, and a model has hundreds of small parameters.
_SHARED_DRAW_MAX = 1 << 22


@functools.lru_cache(maxsize=16)
def _draw_on_device(spec: tuple):
  """One jitted program: key -> a parameter per (name, shape, dtype) of `spec`."""
  sizes = [math.prod(shape) for _, shape, _ in spec]
  small = [i for i, n in enumerate(sizes) if n < _SHARED_DRAW_MAX]

  def draw_all(key):
    shared_key, key = jax.random.split(key)
    shared = jax.random.normal(shared_key, (sum(sizes[i] for i in small),), jnp.float32)
    offsets = dict(zip(small, np.cumsum([0] + [sizes[i] for i in small]).tolist()))
    out = []
    for i, (name, shape, dtype) in enumerate(spec):
      if i in offsets:
        x = jax.lax.dynamic_slice_in_dim(shared, offsets[i], sizes[i]).reshape(shape)
      else:
        x = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
      out.append(_draw_rule(name, shape)(x).astype(dtype))
    return out
  return jax.jit(draw_all)


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def random_params(abstract: Mapping, seed: int = 0, *, shardings: Mapping | None = None,
                  on_device: bool = False) -> dict:
  """Random params for a tree of ShapeDtypeStructs (demos, tests, timing runs, training from
  scratch).

  Matrices and convolution kernels: normal / sqrt(fan_in) (fan_in: the second-last axis, or
  all but the last for convolutions); norm scales: 1 + 0.1 normal; modulations: normal /
  sqrt(dim); biases: 0.02 normal; embeddings and everything else: normal (scaled 0.1 for
  position biases).

  on_device=False draws on the host with NumPy: the modules' own initialisers, run eagerly or
  jitted, compile for up to a minute on a CPU (one XLA program per parameter shape); this
  takes milliseconds for tiny models. With `shardings` (a matching tree) each leaf is placed
  by it, every process drawing the same numbers. on_device=True draws every parameter in ONE
  jitted program on the default device, straight in its dtype: the full-size models (umT5-XXL
  alone has 5.7e9 parameters) take seconds this way and never pass through host memory.
  """
  abstract = dict(abstract)
  if on_device:
    if shardings is not None:
      raise ValueError("random_params: on_device draws on the default device; pass shardings with on_device=False")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    spec = tuple((_leaf_name(path), tuple(leaf.shape), jnp.dtype(leaf.dtype)) for path, leaf in leaves)
    # "rbg" keys: XLA's own bit generator, far quicker to compile than threefry for hundreds of leaves.
    return jax.tree_util.tree_unflatten(treedef, _draw_on_device(spec)(jax.random.key(seed, impl="rbg")))

  rng = np.random.default_rng(seed)

  def draw(path, leaf, sharding=None):
    shape = tuple(leaf.shape)
    x = np.asarray(_draw_rule(_leaf_name(path), shape)(rng.standard_normal(shape, dtype=np.float32)))
    x = x.astype(leaf.dtype)
    if sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(shape, sharding, lambda index: x[index])

  # In the tree's own (sorted) order, so that a seed always gives the same params.
  if shardings is None:
    return jax.tree_util.tree_map_with_path(draw, abstract)
  return jax.tree_util.tree_map_with_path(draw, abstract, dict(shardings))


def random_init(make: Callable[[], nnx.Module], seed: int = 0, *, on_device: bool = False) -> nnx.Module:
  """The module `make()` builds, with random_params instead of its initialisers."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(state, random_params(nnx.to_pure_dict(state), seed, on_device=on_device))
  return nnx.merge(graphdef, state)
