"""``fusion.pretrain``: the stage (:mod:`.stage`), the Ray Train loop and the recipe registry
(:mod:`.loop`), the text recipes (:mod:`.recipes`) and the media recipes (:mod:`.media_recipes`)."""
