"""Knowledge sources, KnowledgeGraph tables, KG embeddings with filtered evaluation, entity linking."""
