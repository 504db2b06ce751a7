"""Cross-modal retrieval: metrics (:mod:`.metrics`), the pair scorer (:mod:`.scorer`), models from
elsewhere (:mod:`.external`: precomputed vectors and scores, Hugging Face models from local
folders), the ``fusion.retrieval`` stage (:mod:`.stage`) and ``stele eval retrieval`` (:mod:`.cli`)."""
