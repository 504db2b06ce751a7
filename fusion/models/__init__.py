"""Fusion encoders, one file per model: ERNIE, K-BERT, K-Adapter, KEPLER, KG-BERT, KnowBERT,
SenseBERT, LIBERT, WKLM, SentiLR; ViLBERT, LXMERT, the single-stream VisualBERT / UNITER / VL-BERT /
B2T2 / Unicoder-VL (``single_stream``, its objectives in ``single_stream_objectives``), the
two-media model; beside them what they share: the text backbone (``backbone``), the transformer
blocks (``layers``), the region inputs (``regions``), the pretraining objectives (``objectives``),
the heads (``heads``) and transformers' LXMERT and VisualBERT weights (``hf_weights``,
``hf_visualbert``).

Models do no I/O: stages and recipes read artifacts and hand them tensors."""
