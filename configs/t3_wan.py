"""T3-Video on Wan DiTs: one config per job (training or sampling), picked by variant.

  python train.py  --config=configs/t3_wan.py:tiny --workdir=/tmp/t3_tiny --config.total_steps=20
  python sample.py --config=configs/t3_wan.py --prompt "..."

Variants (the argument after the colon) and the job they configure:

  variant          job             model
  tiny             train + sample  tiny random DiT: CPU smoke test on synthetic latents;
                                   sampling with tiny random DiT/VAE/umT5 at 64x64x5
  stage1           train           Wan2.1-T2V-1.3B, full fine-tune at 720P (704x1280x81), 5K steps, batch 64
  stage2           train           Wan2.1-T2V-1.3B, full fine-tune at 4K (2176x3840x81) from stage 1, 500 steps
  stage2_lora      train           the same with a rank-64 LoRA on the stage-1 weights
  5b_stage1, 5b_stage2, 5b_stage2_lora
                   train           the same three for Wan2.2-TI2V-5B
  default          sample          T3-Video-Wan2.1-T2V-1.3B at 2176x3840x81 (a bare config path)
  5b               sample          T3-Video-Wan2.2-T2V-5B at 2176x3840x81
  demo             sample          tiny RANDOM DiT/VAE/umT5 at 128x256x9 (no weights needed)

A config holds the groups of its jobs only: `model` (the DiT, shared by both jobs), the
training groups (seed, total_steps, batch_size, data, flow, optimizer, lora, mesh,
checkpoint) and `sample`. train.py refuses a config without the training groups and
sample.py one without `sample`, in one line naming the variants to use. The values are
checked in one place per job: `t3_jax.training.trainer.validate` and `sample.validate`.

Recipe (the paper's): AdamW lr 2e-5, weight decay 1e-2, clip 1.0, flow matching with shift 5
and the release's timestep weights, LoRA on q,k,v,o,ffn.0,ffn.2.
"""

import ml_collections

# Where convert_torch_weights.py / earlier stages put their checkpoints (override on the CLI).
WAN21_1_3B = "checkpoints/wan2.1-t2v-1.3b"
WAN22_5B = "checkpoints/wan2.2-ti2v-5b"
STAGE1_1_3B = "runs/stage1/export"   # `python train.py --export` of a stage-1 workdir
STAGE1_5B = "runs/5b_stage1/export"
# Sampling checkpoints (converted from the T3-Video and Wan releases; see _sample).
T3_WAN21_1_3B = "checkpoints/t3-video-wan2.1-t2v-1.3b"   # T3-Video-Wan2.1-T2V-1.3B.safetensors
T3_WAN22_5B = "checkpoints/t3-video-wan2.2-t2v-5b"       # T3-Video-Wan2.2-T2V-5B.safetensors
WAN21_VAE = "checkpoints/wan2.1-vae"                     # Wan2.1_VAE.pth
WAN22_VAE = "checkpoints/wan2.2-vae"                     # Wan2.2_VAE.pth
UMT5_XXL = "checkpoints/umt5-xxl"                        # models_t5_umt5-xxl-enc-bf16.pth
UMT5_TOKENIZER = "weights/Wan2.1-T2V-1.3B/google/umt5-xxl"


def _model(preset: str) -> ml_collections.ConfigDict:
  """The DiT: what both jobs read (attention, schedule, kernel, compute dtype)."""
  m = ml_collections.ConfigDict()
  m.preset = preset            # t3_jax.models.dit.PRESETS (sampling: the checkpoint's own config wins)
  m.attention = "t3"           # or "full" (the pretrained Wan model as it was)
  m.schedule = ml_collections.FieldReference(None, field_type=str)  # None: published/derived; "n_t,n_h,n_w;..."
  m.implementation = ml_collections.FieldReference(None, field_type=str)  # attention kernel; None: XLA's choice
  m.dtype = "bfloat16"         # compute
  return m


def _train(c: ml_collections.ConfigDict, init_checkpoint: str) -> ml_collections.ConfigDict:
  """Adds the training job's groups (train.py, t3_jax.training.trainer)."""
  c.model.overrides = ml_collections.ConfigDict()  # DiTConfig fields to change
  c.model.init_checkpoint = init_checkpoint    # the DiT to fine-tune; "" = random init
  c.model.param_dtype = "float32"              # master weights
  c.model.remat = "full"                       # t3_jax.models.dit.REMAT_POLICIES

  c.seed = 0
  c.total_steps = 500
  c.batch_size = 8            # global, over all hosts
  c.microbatches = 1          # gradient accumulation: batch_size / microbatches per forward; 0: one
                              # example per batch shard (data x fsdp) per forward
  c.log_every = 1
  c.progress = True

  c.data = ml_collections.ConfigDict()
  c.data.kind = "latents"     # "latents" (t3_jax.training.data prepared dataset) or "synthetic"
  c.data.path = ""
  c.data.frames, c.data.height, c.data.width = 81, 2176, 3840
  c.data.text_len = 512
  c.data.prefetch = 2         # batches read ahead by grain's threads

  c.flow = ml_collections.ConfigDict()
  c.flow.shift = 5.0
  c.flow.round_timesteps_to_bf16 = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = "constant"  # or "cosine"
  c.optimizer.final_lr_ratio = 0.0   # cosine: the last lr as a fraction of lr
  c.optimizer.weight_decay = 1e-2
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.clip_norm = 1.0

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0              # 0: full fine-tune
  c.lora.alpha = 64.0
  c.lora.targets = "q,k,v,o,ffn.0,ffn.2"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence = 1, -1, 1
  c.mesh.relayout = "auto"     # sequence-parallel attention: auto / heads (all-to-all of head groups) / windows
  c.mesh.collective = "auto"   # relayout=windows exchange: auto / all_to_all / ppermute

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100    # steps between saves; 0 = none (but SIGTERM and the end still save)
  c.checkpoint.final = True   # save at the end of the run (benchmarks turn it off)
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  return c


def _sample(c: ml_collections.ConfigDict, dit_checkpoint: str = T3_WAN21_1_3B,
            vae_checkpoint: str = WAN21_VAE) -> ml_collections.ConfigDict:
  """Adds the sampling job's group (sample.py, t3_jax.diffusion.pipeline): the release's
  defaults at native 4K. Set any field with --config.sample.FIELD=."""
  s = c.sample = ml_collections.ConfigDict()
  s.prompt = "A drone shot over a snowy mountain ridge at sunrise, ultra detailed."
  s.prompts_file = ""     # JSON list of {"prompt_en": ...} (4K-World-Vision.json); overrides prompt
  s.negative_prompt = ""  # "" = Wan's standard negative prompt (pipeline.WAN_NEGATIVE_PROMPT)
  s.steps = 50
  s.guidance = 5.0        # CFG scale; 1.0 = no negative pass
  s.shift = 5.0
  s.sampler = "euler"     # "euler" (the release) or "unipc" (Wan's default)
  s.height, s.width, s.frames = 2176, 3840, 81  # frames = 4k+1
  s.size_multiple = 0     # round height/width up to this; 0 = VAE stride x patch (16 / 32)
  s.crop_to_request = False  # centre-crop the rounded-up video back to height x width
  s.fps = 30
  s.seed = 0              # the same seed for every prompt, as the release
  s.output_dir = "samples"
  s.save_latents = False  # also write the denoised latents (.npy, DiT latent space)
  s.overwrite = False     # False: skip prompts whose mp4 exists (resumable batch runs)
  # Checkpoints made by `python convert_torch_weights.py SOURCE DIR --kind dit|vae|umt5`.
  s.dit_checkpoint = dit_checkpoint
  s.vae_checkpoint = vae_checkpoint
  s.umt5_checkpoint = UMT5_XXL
  s.tokenizer_dir = UMT5_TOKENIZER  # the google/umt5-xxl/ folder of a Wan release
  # Random weights, no checkpoints: "tiny-wan2.1"/"tiny-wan2.2" (tiny models, the demo) or a DiT
  # preset ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"): the DiT, its VAE and umT5-XXL at full size (timing).
  s.random_init = ""
  s.random_num_layers = 0  # DiT layers of a random_init model; 0 = the preset's
  s.text_len = 512
  s.vae_tiled = True
  s.vae_tile = (68, 120)        # latent pixels: the release's command line (--tiled true)
  s.vae_tile_stride = (34, 60)  # (56, 104): half the decode work, blends differ near seams
  # Several local GPUs: the DiT's tokens split over `sequence` devices, the conditional and
  # unconditional passes on 2 groups with guidance_parallel; VAE tiles over all of them.
  s.sequence = 1
  s.guidance_parallel = False
  s.progress = True
  return c


def _config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = _model(preset)
  return c


def _tiny() -> ml_collections.ConfigDict:
  """CPU smoke test: a tiny random DiT on synthetic latents (training); the same tiny DiT,
  random, with a random VAE and umT5 for sampling."""
  c = _train(_config("tiny-wan2.1"), init_checkpoint="")
  c.model.schedule = "2,1,1;1,2,2"  # frame windows, then 2x2 spatial blocks (cycled)
  c.model.dtype = "float32"          # CPU: bf16 matmuls are emulated, and slower
  c.model.remat = "none"
  c.data.kind = "synthetic"
  c.data.frames, c.data.height, c.data.width = 5, 64, 64  # latents [16, 2, 8, 8]: 2x4x4 tokens
  c.data.text_len = 8
  c.batch_size, c.total_steps = 2, 20
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 2
  c.checkpoint.every, c.checkpoint.keep = 5, 2
  c = _sample(c)
  c.sample.random_init = "tiny-wan2.1"
  c.sample.height, c.sample.width, c.sample.frames, c.sample.steps = 64, 64, 5, 4
  c.sample.fps, c.sample.text_len, c.sample.output_dir = 8, 64, "samples/tiny"
  return c


def _wan_train(preset: str, stage: int, lora: bool) -> ml_collections.ConfigDict:
  """The paper's two stages on one Wan DiT (preset wan2.1-t2v-1.3b or wan2.2-ti2v-5b)."""
  is_5b = preset == "wan2.2-ti2v-5b"
  if stage == 1:
    c = _train(_config(preset), WAN22_5B if is_5b else WAN21_1_3B)
    c.data.frames, c.data.height, c.data.width = 81, 704, 1280
    c.batch_size, c.total_steps = 64, 5000
  else:
    c = _train(_config(preset), STAGE1_5B if is_5b else STAGE1_1_3B)
    c.data.frames, c.data.height, c.data.width = 81, 2176, 3840
    c.batch_size, c.total_steps = 8, 500
    c.microbatches = 0  # one 4K video per batch shard per forward, gradients accumulated
    # 4K tokens split over devices: 685,440 for the 1.3B (VAE stride 8), 171,360 for the 5B (16).
    c.mesh.sequence = 4 if is_5b else 8
    if lora:
      c.lora.rank, c.lora.alpha = 64, 64.0
  return c


def _demo() -> ml_collections.ConfigDict:
  """Sampling on a fresh machine with no weights: tiny RANDOM DiT/VAE/umT5 (noise-like video),
  9 frames at 128x256, T3 windows from a derived schedule; well under two minutes on 2 CPU cores."""
  c = _sample(_config("tiny-wan2.1"))
  c.model.dtype = "float32"          # CPU: bf16 matmuls are emulated, and slower
  c.sample.random_init = "tiny-wan2.1"
  c.sample.random_num_layers = 5     # one full cycle of the 5 derived window patterns
  c.sample.height, c.sample.width, c.sample.frames = 128, 256, 9  # tokens (3, 8, 16)
  c.sample.steps = 8
  c.sample.fps = 8
  c.sample.text_len = 64
  c.sample.output_dir = "samples/demo"
  return c


VARIANTS = {
    "tiny": _tiny,
    "stage1": lambda: _wan_train("wan2.1-t2v-1.3b", 1, False),
    "stage2": lambda: _wan_train("wan2.1-t2v-1.3b", 2, False),
    "stage2_lora": lambda: _wan_train("wan2.1-t2v-1.3b", 2, True),
    "5b_stage1": lambda: _wan_train("wan2.2-ti2v-5b", 1, False),
    "5b_stage2": lambda: _wan_train("wan2.2-ti2v-5b", 2, False),
    "5b_stage2_lora": lambda: _wan_train("wan2.2-ti2v-5b", 2, True),
    "default": lambda: _sample(_config("wan2.1-t2v-1.3b")),
    "5b": lambda: _sample(_config("wan2.2-ti2v-5b"), T3_WAN22_5B, WAN22_VAE),
    "demo": _demo,
}
TRAIN_VARIANTS = tuple(v for v in VARIANTS if v == "tiny" or "stage" in v)
SAMPLE_VARIANTS = ("default", "5b", "demo", "tiny")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}: choose one of {', '.join(VARIANTS)}")
  c = VARIANTS[arg]()
  c.variant = arg
  return c
