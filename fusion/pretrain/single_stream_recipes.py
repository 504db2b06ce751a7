"""Single-stream pretraining recipes: VisualBERT, UNITER, VL-BERT, B2T2 and Unicoder-VL on the
image-caption pairs of one feature artifact (``media`` input), the same data, split and batches as
``lxmert`` / ``vilbert`` (:class:`fusion.pretrain.media_recipes.MediaRecipe`).

- ``visualbert``: :class:`fusion.models.single_stream.SingleStream`, variant ``visualbert`` (Li et al.
  2019): MLM and sentence-image matching in one pass.
- ``uniter``: variant ``uniter`` (Chen et al. 2020): conditional masking (MLM or masked region
  feature regression per item, matched pairs only), then ITM and word-region alignment by optimal
  transport on the uncorrupted pairs.
- ``vlbert``: variant ``vlbert`` (Su et al. 2020): the visual feature embedding on every element; MLM
  and masked region feature regression in one pass (no detector labels in the features), no
  matching head, so it is scored by its dual encoder only (``dual``).
- ``b2t2``: variant ``b2t2`` (Alberti et al. 2019): the whole image's feature fused into every word
  embedding; MLM and image-caption matching in one pass.
- ``unicoder_vl``: variant ``unicoder_vl`` (Li et al. 2020): regions with 5-d locations; MLM, masked
  region feature regression (for masked object classification: no detector labels) and
  visual-linguistic matching in one pass.

All start their embeddings and layers from the text backbone
(:func:`fusion.models.hf_visualbert.single_stream_backbone`). Unless ``options.config`` says otherwise,
all add the in-batch InfoNCE on the single-modality passes (``contrastive_weight`` 1, mean-pooled
text; in none of the papers, as for ``lxmert``), so that the model's own dual-encoder vectors are a
trained first stage for ``fusion.retrieval``'s ``rerank``; the cross-encoder score is the matching
head on the pair, scored like LXMERT's (``all_pairs``, ``rerank``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import field_validator

from fusion.models.backbone import TextBackbone
from fusion.pretrain.loop import recipe
from fusion.pretrain.media_recipes import MediaOptions, MediaRecipe, _check_fields

# set by the recipe: from the backbone, the features, or the recipe's name
FIXED = {"variant", "vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers",
         "visual_feat_dim", "global_token"}
DEFAULTS = {"contrastive_weight": 1.0, "text_pool": "mean"}


class SingleStreamOptions(MediaOptions):
    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fusion.models.single_stream import SingleStreamConfig

        return _check_fields(v, SingleStreamConfig, FIXED)


class SingleStreamRecipe(MediaRecipe):
    """A :class:`SingleStream` of the recipe's ``variant`` over the backbone and the media's features."""

    Options = SingleStreamOptions
    variant: ClassVar[str] = ""

    def build(self, backbone: TextBackbone, resources: dict[str, Any], options: SingleStreamOptions) -> Any:
        from fusion.models.hf_visualbert import single_stream_backbone

        return single_stream_backbone(backbone, self.variant, **(DEFAULTS | options.config | {
            "visual_feat_dim": resources["feature_dim"], "global_token": resources["global_token"]}))


@recipe("visualbert")
class VisualBertRecipe(SingleStreamRecipe):
    variant = "visualbert"


@recipe("uniter")
class UniterRecipe(SingleStreamRecipe):
    variant = "uniter"


@recipe("vlbert")
class VLBertRecipe(SingleStreamRecipe):
    variant = "vlbert"


@recipe("b2t2")
class B2T2Recipe(SingleStreamRecipe):
    variant = "b2t2"


@recipe("unicoder_vl")
class UnicoderVLRecipe(SingleStreamRecipe):
    variant = "unicoder_vl"
