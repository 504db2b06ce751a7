"""Fusion encoders, one file per model: ERNIE, K-BERT, K-Adapter, ViLBERT, LXMERT, the two-media
model; the text backbone, the heads, the objectives' masking, and the layers they share.

Models do no I/O: stages and recipes read artifacts and hand them tensors."""
