"""``fusion.finetune``: tasks and metrics (:mod:`.tasks`), span encoders (:mod:`.encoders`), the
classifier and its loop (:mod:`.classifier`), the stage (:mod:`.stage`)."""
