"""Fusion encoders, one file per model: ERNIE, K-BERT, K-Adapter, ViLBERT, LXMERT, the two-media
model; beside them what they share: the text backbone (``backbone``), the transformer blocks
(``layers``), the region inputs (``regions``), the pretraining objectives (``objectives``), the
heads (``heads``) and transformers' LXMERT weights (``hf_weights``).

Models do no I/O: stages and recipes read artifacts and hand them tensors."""
