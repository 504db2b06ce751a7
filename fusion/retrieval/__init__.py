"""Cross-modal retrieval: metrics (:mod:`.metrics`), the pair scorer (:mod:`.scorer`), the
``fusion.retrieval`` stage (:mod:`.stage`) and ``stele eval retrieval`` (:mod:`.cli`)."""
