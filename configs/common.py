"""Pieces shared by every config: model sizes of the released variants, and `parse_arg`.

Values mirror ../shared/design/reference.md; the comment on each names its section.
"""
import ml_collections as mlc

# Perception backbones (reference.md §2).
SWIN = {
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12),
}
# Cognition encoders (reference.md §3).
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


def model_config(*, swin: str, beit3: str, num_queries: int, max_tokens: int) -> mlc.ConfigDict:
  """The DeRIS model section for a released variant (B = Swin-S + BEiT3-base, L = Swin-B + large)."""
  return mlc.ConfigDict(dict(
      dtype="float32",  # compute dtype; 'bfloat16' for speed (params stay float32)
      reference_compat=True,  # reproduce the official quirks (design README)
      compat_group_size=16,  # query_SA batch-axis attention group (§4); 1 for gRefCOCO
      num_queries=num_queries,  # §1 table: 10 RefCOCO, 20 gRefCOCO
      hidden_dim=256,  # §2/§4: conv_dim = mask_dim = decoder hidden = projections
      image_size=(384, 384),  # §2 perception input
      cognition_image_size=(224, 224),  # §3 BEiT-3 input
      max_tokens=max_tokens,  # §3: 20 RefCOCO, 50 gRefCOCO
      existence_veto=False,  # corrected model only: existence head may veto (design README)
      existence_threshold=0.5,
      swin=dict(patch_size=4, mlp_ratio=4.0, drop_path_rate=0.3, **SWIN[swin]),  # §2
      pixel_decoder=dict(num_heads=8, num_points=4, num_layers=6, ffn_dim=1024,  # §2
                         num_groups=32),
      beit3=dict(vocab_size=64010, patch_size=16, max_source_positions=1024,  # §3
                 layernorm_eps=1e-5, **BEIT3[beit3]),
      decoder=dict(num_heads=8, ffn_dim=2048, num_layers=3, text_num_heads=8),  # §4
      existence=dict(num_layers=3, num_heads=8, ffn_dim=512, dropout=0.1),  # §4 aligner
  ))
