"""The key tables of the pretrained initial weights (docs/design.md §11): one rename table and one
ignore table per source file (Mask2Former `.pkl`, BEiT-3 `.pth`), which model parameters each
file must provide, and which keep their official initialiser, with the reason for each.

How the official loaders read the files (what the tables encode):
  * Mask2Former (`swin_trans.py::init_weights`, `perception_branch_loopback.py::
    initial_mask_module`): `backbone.*` into the Swin with `strict=True`;
    `sem_seg_head.pixel_decoder.*` and `sem_seg_head.predictor.*` with `strict=False` (keys
    without a parameter are skipped); every other key is never read.
  * BEiT-3 (`beit3.py::load_model_and_may_interpolate` -> `utils.load_state_dict`): the whole
    state dict, non-strict; only `beit3.*` names a parameter of the wrapped model.
Renames are regexes applied with `re.sub` at the start of the key (first match wins); leaf
names and layouts (Linear/Conv transposes, LayerNorm `scale`, Embedding `embedding`, packed
`in_proj`) are handled by `torch_to_nnx`.
"""
import dataclasses
from typing import Tuple

from deris_jax.convert.torch_to_nnx import Drop, Rule

MASK2FORMER = "mask2former"
BEIT3 = "beit3"


@dataclasses.dataclass(frozen=True)
class Namespace:
  """Official keys under `prefix` are read; `strict`: a key with no parameter is an error
  (else it is ignored, as `load_state_dict(strict=False)` does)."""
  prefix: str
  strict: bool


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  role: str  # the command-line flag: --mask2former / --beit3
  description: str  # what the file is, for messages
  namespaces: Tuple[Namespace, ...]
  rules: Tuple[Rule, ...]
  drops: Tuple[Drop, ...]  # keys read but not used, with the reason
  not_read: str  # reason for keys outside every namespace
  provides: str  # regex over model paths: every one matching must come from this file
  adjust: Tuple[Tuple[str, str, str], ...]  # (official key, model path, adjustment kind)


# ------------------------------------------------------------------------------------------
# Mask2Former COCO-instance Swin checkpoint (detectron2 pickle).

MASK2FORMER_RULES = (
    Rule(r"backbone\.", "swin."),
    # detectron2's Conv2d(norm=...) keeps its norm inside the conv; DeRIS uses Sequential(conv, GN).
    Rule(r"sem_seg_head\.pixel_decoder\.(adapter_1|layer_1)\.norm\.", r"pixel_decoder.\1.1."),
    Rule(r"sem_seg_head\.pixel_decoder\.(adapter_1|layer_1)\.weight$",
         r"pixel_decoder.\1.0.weight"),
    Rule(r"sem_seg_head\.pixel_decoder\.", "pixel_decoder."),
    Rule(r"sem_seg_head\.predictor\.", "decoder."),
)

MASK2FORMER_DROPS = (
    Drop(r"^backbone\..*\.relative_position_index$",
         "Swin buffer; recomputed from the window size (checked equal on conversion)"),
    Drop(r"^sem_seg_head\.predictor\.class_embed\.",
         "Mask2Former's COCO class head; DeRIS has no parameter of this name "
         "(strict=False skips it)"),
    Drop(r"^sem_seg_head\.predictor\.(query_feat|static_query)\.",
         "Mask2Former's learned query features; DeRIS's queries come from the cognition branch "
         "(strict=False skips it)"),
)


def extra_decoder_layers_drop(num_layers: int) -> Drop:
  """Mask2Former has 9 decoder layers; DeRIS keeps the first `num_layers` (dec_layers=3)."""
  kept = "|".join(str(i) for i in range(num_layers))
  return Drop(
      rf"^sem_seg_head\.predictor\.transformer_(self_attention|cross_attention|ffn)_layers\."
      rf"(?!(?:{kept})\.)\d+\.",
      f"Mask2Former decoder layers past the first {num_layers}: DeRIS has {num_layers} "
      "(dec_layers); strict=False skips the others")


MASK2FORMER_PROVIDES = (
    r"^swin\."
    r"|^pixel_decoder\.(?!(adapter_1|layer_1)\.0\.bias$)"
    r"|^decoder\.(transformer_(self_attention|cross_attention|ffn)_layers|decoder_norm"
    r"|level_embed|mask_embed|query_embed)\.")

MASK2FORMER_SPEC = SourceSpec(
    role=MASK2FORMER,
    description="Mask2Former Swin checkpoint (detectron2 .pkl)",
    namespaces=(Namespace("backbone.", strict=True),
                Namespace("sem_seg_head.pixel_decoder.", strict=False),
                Namespace("sem_seg_head.predictor.", strict=False)),
    rules=MASK2FORMER_RULES,
    drops=MASK2FORMER_DROPS,
    not_read="never read by the official loader (it reads backbone.*, "
             "sem_seg_head.pixel_decoder.* and sem_seg_head.predictor.*)",
    provides=MASK2FORMER_PROVIDES,
    adjust=(("sem_seg_head.predictor.query_embed.weight", "decoder.query_embed.embedding",
             "first_rows"),),
)

# ------------------------------------------------------------------------------------------
# unilm BEiT-3 pretrained checkpoint (torch.save).

BEIT3_RULES = (Rule(r"beit3\.", "beit3."),)  # one to one

BEIT3_DROPS = (
    Drop(r"^beit3\.vision_embed\.mask_token$",
         "masked-image-modelling token, unused without masked positions (deris-jax has no "
         "parameter for it)"),
)

BEIT3_SPEC = SourceSpec(
    role=BEIT3,
    description="BEiT-3 pretrained checkpoint (unilm .pth/.zip)",
    namespaces=(Namespace("beit3.", strict=False),),
    rules=BEIT3_RULES,
    drops=BEIT3_DROPS,
    not_read="not a BEiT3 parameter (outside beit3.*, e.g. a pretraining head); the official "
             "loader reports it as unexpected and skips it",
    provides=r"^beit3\.",
    adjust=(("beit3.encoder.embed_positions.A.weight", "beit3.encoder.embed_positions.A.embedding",
             "vision_positions"),),
)

SPECS = (MASK2FORMER_SPEC, BEIT3_SPEC)

# ------------------------------------------------------------------------------------------
# Everything no file provides: the official initialisers (`build_model`), first match wins.

INITIALISED = (
    (r"^pixel_decoder\.(adapter_1|layer_1)\.0\.bias$",
     "detectron2's conv before GroupNorm has no bias: keeps its init value 0"),
    (r"^decoder\.",
     "DeRIS loopback modules and heads that Mask2Former lacks (query_SA, Q2TCA, SEG_cls, "
     "refer_proj, channel_proj_conv, box_embed, cls_embed)"),
    (r"^cognition\.", "cognition-branch projections and learned queries (init_query)"),
    (r"^existence\.", "existence head (multi-grain aligner, nt_embed, logit_embed)"),
)
