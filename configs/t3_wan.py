"""T3-Video on Wan DiTs: training and sampling configs.

  python train.py --config=configs/t3_wan.py:tiny --workdir=/tmp/t3_tiny --config.total_steps=20

Variants (the argument after the colon):
  tiny          CPU smoke test: tiny random DiT, synthetic latents, a few seconds per step
  stage1        Wan2.1-T2V-1.3B full fine-tune at 720P (704x1280x81), 5K steps, batch 64
  stage2        Wan2.1-T2V-1.3B full fine-tune at 4K (2176x3840x81) from stage 1, 500 steps
  stage2_lora   the same with a rank-64 LoRA on the stage-1 weights
  5b_stage1, 5b_stage2, 5b_stage2_lora   the same for Wan2.2-TI2V-5B
  demo          sampling with a tiny random DiT (no weights needed)
  default       what a bare `--config=configs/t3_wan.py` gives: training = stage1 (the
                retrofit starts there: `python train.py --config=configs/t3_wan.py`), sampling =
                T3-Video-Wan2.1-T2V-1.3B at 2176x3840x81 (`python sample.py --config=configs/t3_wan.py`)
  5b            sampling: T3-Video-Wan2.2-T2V-5B at 2176x3840x81

Recipe (T3_REFERENCE.md section 3): AdamW lr 2e-5, weight decay 1e-2, clip 1.0, flow
matching with shift 5 and the release's timestep weights, LoRA on q,k,v,o,ffn.0,ffn.2.
"""

import ml_collections

# Where convert_torch_weights.py / earlier stages put their checkpoints (override on the CLI).
WAN21_1_3B = "checkpoints/wan2.1-t2v-1.3b"
WAN22_5B = "checkpoints/wan2.2-ti2v-5b"
STAGE1_1_3B = "runs/stage1/export"   # `python train.py --export` of a stage-1 workdir
STAGE1_5B = "runs/5b_stage1/export"
# Sampling checkpoints (converted from the T3-Video and Wan releases; see c.sample).
T3_WAN21_1_3B = "checkpoints/t3-video-wan2.1-t2v-1.3b"   # T3-Video-Wan2.1-T2V-1.3B.safetensors
T3_WAN22_5B = "checkpoints/t3-video-wan2.2-t2v-5b"       # T3-Video-Wan2.2-T2V-5B.safetensors
WAN21_VAE = "checkpoints/wan2.1-vae"                     # Wan2.1_VAE.pth
WAN22_VAE = "checkpoints/wan2.2-vae"                     # Wan2.2_VAE.pth
UMT5_XXL = "checkpoints/umt5-xxl"                        # models_t5_umt5-xxl-enc-bf16.pth
UMT5_TOKENIZER = "weights/Wan2.1-T2V-1.3B/google/umt5-xxl"


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 500
  c.batch_size = 8            # global, over all hosts
  c.microbatches = 1          # gradient accumulation: batch_size / microbatches per forward
  c.log_every = 1
  c.progress = True

  c.model = ml_collections.ConfigDict()
  c.model.preset = "wan2.1-t2v-1.3b"          # t3_jax.models.dit.PRESETS
  c.model.overrides = ml_collections.ConfigDict()  # DiTConfig fields to change
  c.model.init_checkpoint = WAN21_1_3B         # "" = random init
  c.model.attention = "t3"
  c.model.schedule = ml_collections.FieldReference(None, field_type=str)  # None: published/derived; "n_t,n_h,n_w;..."
  c.model.dtype = "bfloat16"                   # compute
  c.model.param_dtype = "float32"              # master weights
  c.model.remat = "full"                       # t3_jax.models.dit.REMAT_POLICIES
  c.model.implementation = ml_collections.FieldReference(None, field_type=str)  # attention kernel

  c.data = ml_collections.ConfigDict()
  c.data.kind = "latents"     # "latents" (t3_jax.training.data prepared dataset) or "synthetic"
  c.data.path = ""
  c.data.frames, c.data.height, c.data.width = 81, 2176, 3840
  c.data.text_len = 512

  c.flow = ml_collections.ConfigDict()
  c.flow.shift = 5.0
  c.flow.round_timesteps_to_bf16 = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-5
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = "constant"  # or "cosine"
  c.optimizer.weight_decay = 1e-2
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.clip_norm = 1.0

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0              # 0: full fine-tune
  c.lora.alpha = 64.0
  c.lora.targets = "q,k,v,o,ffn.0,ffn.2"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, -1, 1, 1
  c.mesh.relayout = "auto"     # sequence-parallel attention: auto / heads (all-to-all of head groups) / windows
  c.mesh.collective = "auto"   # relayout=windows exchange: auto / all_to_all / ppermute

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100    # steps between saves; 0 = none (but SIGTERM and the end still save)
  c.checkpoint.final = True   # save at the end of the run (benchmarks turn it off)
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # Sampling (sample.py, t3_jax.diffusion.pipeline): T3-Video-Wan2.1-T2V-1.3B at native 4K, the
  # release's defaults (T3_REFERENCE.md section 4). Set any field with --config.sample.FIELD=.
  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "A drone shot over a snowy mountain ridge at sunrise, ultra detailed."
  c.sample.prompts_file = ""     # JSON list of {"prompt_en": ...} (4K-World-Vision.json); overrides prompt
  c.sample.negative_prompt = ""  # "" = Wan's standard negative prompt (pipeline.WAN_NEGATIVE_PROMPT)
  c.sample.steps = 50
  c.sample.guidance = 5.0        # CFG scale; 1.0 = no negative pass
  c.sample.shift = 5.0
  c.sample.sampler = "euler"     # "euler" (the release) or "unipc" (Wan's default)
  c.sample.height, c.sample.width, c.sample.frames = 2176, 3840, 81  # frames = 4k+1
  c.sample.size_multiple = 0     # round height/width up to this; 0 = VAE stride x patch (16 / 32)
  c.sample.crop_to_request = False  # centre-crop the rounded-up video back to height x width
  c.sample.fps = 30
  c.sample.seed = 0              # the same seed for every prompt, as the release
  c.sample.output_dir = "samples"
  c.sample.save_latents = False  # also write the denoised latents (.npy, DiT latent space)
  c.sample.overwrite = False     # False: skip prompts whose mp4 exists (resumable batch runs)
  # Checkpoints made by `python convert_torch_weights.py SOURCE DIR --kind dit|vae|umt5`.
  c.sample.dit_checkpoint = T3_WAN21_1_3B
  c.sample.vae_checkpoint = WAN21_VAE
  c.sample.umt5_checkpoint = UMT5_XXL
  c.sample.tokenizer_dir = UMT5_TOKENIZER  # the google/umt5-xxl/ folder of a Wan release
  # Random weights, no checkpoints: "tiny-wan2.1"/"tiny-wan2.2" (tiny models, the demo) or a DiT
  # preset ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"): the DiT, its VAE and umT5-XXL at full size (timing).
  c.sample.random_init = ""
  c.sample.random_num_layers = 0  # DiT layers of a random_init model; 0 = the preset's
  c.sample.attention = "t3"      # or "full" (the pretrained Wan model as it was)
  c.sample.schedule = ml_collections.FieldReference(None, field_type=str)  # None: published/derived
  c.sample.implementation = ml_collections.FieldReference(None, field_type=str)  # attention kernel
  c.sample.dtype = "bfloat16"
  c.sample.text_len = 512
  c.sample.vae_tiled = True
  c.sample.vae_tile = (68, 120)        # latent pixels: the release's command line (--tiled true)
  c.sample.vae_tile_stride = (34, 60)  # (56, 104): half the decode work, blends differ near seams
  # Several local GPUs: the DiT's tokens split over `sequence` devices, the conditional and
  # unconditional passes on 2 groups with guidance_parallel; VAE tiles over all of them.
  c.sample.sequence = 1
  c.sample.guidance_parallel = False
  c.sample.progress = True
  return c


def _tiny(c):
  c.model.preset = "tiny-wan2.1"
  c.model.init_checkpoint = ""
  c.model.schedule = "2,1,1;1,2,2"  # frame windows, then 2x2 spatial blocks (cycled)
  c.model.dtype = "float32"                  # CPU: bf16 matmuls are emulated, and slower
  c.model.remat = "none"
  c.data.kind = "synthetic"
  c.data.frames, c.data.height, c.data.width = 5, 64, 64  # latents [16, 2, 8, 8]: 2x4x4 tokens
  c.data.text_len = 8
  c.batch_size, c.total_steps = 2, 20
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 2
  c.checkpoint.every, c.checkpoint.keep = 5, 2
  c.mesh.fsdp = -1
  c.sample.height, c.sample.width, c.sample.frames, c.sample.steps = 64, 64, 5, 4
  return c


def _wan21(c, stage: int, lora: bool):
  c.model.preset = "wan2.1-t2v-1.3b"
  if stage == 1:
    c.model.init_checkpoint = WAN21_1_3B
    c.data.frames, c.data.height, c.data.width = 81, 704, 1280
    c.batch_size, c.total_steps = 64, 5000
    c.mesh.fsdp = -1
  else:
    c.model.init_checkpoint = STAGE1_1_3B
    c.data.frames, c.data.height, c.data.width = 81, 2176, 3840
    c.batch_size, c.total_steps = 8, 500
    c.mesh.fsdp, c.mesh.sequence = -1, 8   # 685,440 tokens split over 8 devices
    if lora:
      c.lora.rank, c.lora.alpha = 64, 64.0
  return c


def _wan22(c, stage: int, lora: bool):
  c = _wan21(c, stage, lora)
  c.model.preset = "wan2.2-ti2v-5b"
  c.model.init_checkpoint = WAN22_5B if stage == 1 else STAGE1_5B
  if stage == 2:
    c.mesh.sequence = 4  # 171,360 tokens (VAE stride 16)
  return c


def _sample_5b(c):
  """Sampling with T3-Video-Wan2.2-T2V-5B at native 4K (VAE stride 16: sizes in multiples of 32)."""
  c.sample.dit_checkpoint = T3_WAN22_5B
  c.sample.vae_checkpoint = WAN22_VAE
  return c


def _sample_demo(c):
  """Sampling on a fresh machine with no weights: tiny RANDOM DiT/VAE/umT5 (noise-like video),
  9 frames at 128x256, T3 windows from a derived schedule; well under two minutes on 2 CPU cores."""
  c = _tiny(c)
  c.sample.random_init = "tiny-wan2.1"
  c.sample.random_num_layers = 5  # one full cycle of the 5 derived window patterns
  c.sample.height, c.sample.width, c.sample.frames = 128, 256, 9  # tokens (3, 8, 16)
  c.sample.steps = 8
  c.sample.fps = 8
  c.sample.dtype = "float32"      # CPU: bf16 matmuls are emulated, and slower
  c.sample.text_len = 64
  c.sample.output_dir = "samples/demo"
  return c


VARIANTS = {
    "default": lambda c: _wan21(c, 1, False),  # training: stage1; sampling: c.sample (4K T3-1.3B)
    "5b": _sample_5b,
    "tiny": _tiny,
    "stage1": lambda c: _wan21(c, 1, False),
    "stage2": lambda c: _wan21(c, 2, False),
    "stage2_lora": lambda c: _wan21(c, 2, True),
    "5b_stage1": lambda c: _wan22(c, 1, False),
    "5b_stage2": lambda c: _wan22(c, 2, False),
    "5b_stage2_lora": lambda c: _wan22(c, 2, True),
    "demo": _sample_demo,  # sampling with tiny random models (no weights); see _sample_demo
}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}: choose one of {sorted(VARIANTS)}")
  c = VARIANTS[arg](_base())
  c.variant = arg
  return c
