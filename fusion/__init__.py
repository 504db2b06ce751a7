"""Fusion encoders (ERNIE, K-BERT, K-Adapter, ViLBERT, LXMERT), pretraining objectives, retrieval."""
