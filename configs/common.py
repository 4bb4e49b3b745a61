"""Pieces shared by every config: model sizes of the released variants, the training sections,
`parse_arg` / `choice` for config arguments (values two sections read are linked by `deris_jax.config_check.link_shared`).

Values mirror docs/design.md; the comment on each names its section.
"""
import ml_collections as mlc

from deris_jax import losses

# Perception backbones (docs/design.md §2).
SWIN = {
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12),
}
# Cognition encoders (docs/design.md §3).
BEIT3 = {
    "base": dict(embed_dim=768, num_layers=12, num_heads=12, ffn_dim=3072, drop_path_rate=0.1),
    # QUIRK §3: `rop_path_rate` typo in the official wrapper -> BEiT3-large trains with 0.
    "large": dict(embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, drop_path_rate=0.0),
}


def parse_arg(arg, **defaults):
  """'a=1,b=x' -> ConfigDict with typed defaults (big_vision style); a bare word sets it True."""
  out = mlc.ConfigDict(defaults)
  if arg:
    for item in arg.split(","):
      if not item:
        continue
      key, _, value = item.partition("=")
      if key not in defaults:
        raise ValueError(f"unknown config argument '{key}'; known: {sorted(defaults)}")
      if not _:
        value = True
      elif isinstance(defaults[key], bool):
        value = value.lower() in ("1", "true", "yes")
      else:
        value = type(defaults[key])(value)
      out[key] = value
  return out


def choice(name: str, value: str, options: dict):
  """options[value], or a ValueError naming the config argument and the known values."""
  if value not in options:
    raise ValueError(f"unknown config argument {name}={value}; known: {sorted(options)}")
  return options[value]


def model_config(*, swin: str, beit3: str, num_queries: int, max_tokens: int) -> mlc.ConfigDict:
  """The DeRIS model section for a released variant (B = Swin-S + BEiT3-base, L = Swin-B + large)."""
  return mlc.ConfigDict(dict(
      dtype="float32",  # compute dtype; 'bfloat16' for speed (params stay float32)
      reference_compat=True,  # reproduce the official quirks (docs/design.md, quirks table)
      compat_group_size=16,  # query_SA batch-axis attention group (§4); 1 for gRefCOCO
      num_queries=num_queries,  # §1 table: 10 RefCOCO, 20 gRefCOCO
      hidden_dim=256,  # §2/§4: conv_dim = mask_dim = decoder hidden = projections
      image_size=(384, 384),  # §2 perception input
      cognition_image_size=(224, 224),  # §3 BEiT-3 input
      max_tokens=max_tokens,  # §3: 20 RefCOCO, 50 gRefCOCO
      remat=False,  # recompute BEiT-3 layers in the backward pass (large batches / DeRIS-L)
      # Repeated stacks as one lax.scan each (deris_jax/models/scan.py): the BEiT-3 layers, the
      # Swin stages of 2+ (regular, shifted) block pairs and the pixel decoder's deformable
      # encoder layers. Same numbers as the loops (tests/test_scan.py; the parity command
      # passes with --config.model.scan_layers=true), checkpoints per layer as before (the
      # train state holds the stacks stacked: deris_jax/models/stack_layout.py); faster
      # compile.
      scan_layers=False,
      existence_veto=False,  # corrected model only: the existence head may veto (docs/design.md)
      existence_threshold=0.5,
      swin=dict(patch_size=4, mlp_ratio=4.0, drop_path_rate=0.3, **SWIN[swin]),  # §2
      pixel_decoder=dict(num_heads=8, num_points=4, num_layers=6, ffn_dim=1024,  # §2
                         num_groups=32),
      beit3=dict(vocab_size=64010, patch_size=16, max_source_positions=1024,  # §3
                 layernorm_eps=1e-5, **BEIT3[beit3]),
      decoder=dict(num_heads=8, ffn_dim=2048, num_layers=3, text_num_heads=8),  # §4
      existence=dict(num_layers=3, num_heads=8, ffn_dim=512, dropout=0.1),  # §4 aligner
  ))


# ----------------------------------------------------------------------------------------------
# Training sections (deris_jax.train): loss, optimizer, schedule, train loop, mesh, sharding.


def loss_config() -> mlc.ConfigDict:
  """The objective of the released models: `deris_jax.losses.default_loss_config()` (one home
  for its values and their official names)."""
  return losses.default_loss_config()


def optimizer_config() -> mlc.ConfigDict:
  """Adam + amsgrad with the official param groups (docs/design.md §9)."""
  return mlc.ConfigDict(dict(
      name="adam",  # §9 torch Adam (not AdamW), its exact update rule
      lr=1e-4,  # §9
      b1=0.9,  # §9 betas
      b2=0.98,  # §9 betas
      eps=1e-9,  # §9
      weight_decay=0.0,  # §9
      amsgrad=True,  # §9
      clip_norm=0.15,  # §9 grad_norm_clip: clip_grad_norm_ over all trained parameters
      # §9 hier_vision_encoder (Swin) frozen: no gradient, no optimizer state. Must agree with
      # model.freeze_swin (default True).
      frozen=(r"^swin\.",),
      # §9 groups: vis_enc (BEiT-3) lr/2; pixel decoder and the rest x1; first match wins.
      lr_multipliers=((r"^beit3\.", 0.5),),
  ))


def schedule_config(*, warmup_epochs: int, decay_epochs, decay_ratio: float = 0.1,
                    name: str = "multistep_warmup") -> mlc.ConfigDict:
  """The per-epoch MultiStepLRWarmUp factors (docs/design.md §9; deris_jax.train.schedule)."""
  return mlc.ConfigDict(dict(
      name=name,  # multistep_warmup | linear_warmup | constant
      warmup_epochs=warmup_epochs,  # §9: epoch e < warmup runs at (e + 1) / (warmup + 1)
      decay_epochs=tuple(decay_epochs),  # §9 decay_steps: x decay_ratio once epoch + 1 >= s
      decay_ratio=decay_ratio,  # §9
  ))


def train_config(*, epochs: int) -> mlc.ConfigDict:
  """The loop: length, seed, intervals, checkpoints (deris_jax.train.loop).

  The global batch is `data.batch_size` (per-device batch x devices).
  """
  return mlc.ConfigDict(dict(
      epochs=epochs,  # §9 max_epoch; steps per epoch = ceil(train examples / global batch)
      max_steps=0,  # > 0: stop after this many steps (smoke runs); the schedule keeps epochs
      seed=6666,  # §9
      # Initial params (without --init_from): 'host' draws them with numpy (seconds, nothing
      # to compile); 'jit' compiles an initialiser that writes into the shardings directly.
      init="host",
      log_every_steps=50,  # §9 log_interval
      eval_every_steps=0,  # 0: use eval_every_epochs
      eval_every_epochs=1,  # §9 validation every epoch; 0 with eval_every_steps 0: never
      checkpoint_every_steps=0,  # 0: use checkpoint_every_epochs
      checkpoint_every_epochs=1,  # a final checkpoint is always written
      keep_checkpoints=3,  # Orbax max_to_keep
      async_checkpoint=True,  # write in the background while training continues
      distributed=False,  # call jax.distributed.initialize() (multi-host pods)
      tensorboard=True,  # event files in the workdir
  ))


def mesh_config(*, data: int = -1, fsdp: int = 1) -> mlc.ConfigDict:
  """Device mesh axes (deris_jax.sharding); -1 takes the devices left."""
  return mlc.ConfigDict(dict(data=data, fsdp=fsdp))


def sharding_config() -> mlc.ConfigDict:
  """Regex rules -> shardings of the train state (deris_jax.sharding)."""
  return mlc.ConfigDict(dict(
      rules=((".*", "fsdp"),),  # fsdp: largest dimension divisible by the fsdp axis
      fsdp_min_size=2 ** 14,  # smaller leaves are replicated
  ))


def add_training(config: mlc.ConfigDict, *, epochs: int, warmup_epochs: int,
                 decay_epochs) -> mlc.ConfigDict:
  """Adds the loss, optimizer, schedule, train, mesh and sharding sections to `config`."""
  config.loss = loss_config()
  if "data" in config:  # one value: the sampler's and the loss's per-GPU groups agree
    config.loss.official_world_size = config.data.get_ref("official_world_size")
  config.optimizer = optimizer_config()
  config.schedule = schedule_config(warmup_epochs=warmup_epochs, decay_epochs=decay_epochs)
  config.train = train_config(epochs=epochs)
  config.mesh = mesh_config()
  config.sharding = sharding_config()
  return config
