"""stele's pipeline engine: YAML DAGs of registered stages, run on Ray, cached in a content-addressed store.

The public API for writing stages::

    from pipeline import stage, StageContext
"""

from .context import StageContext
from .errors import SpecError, StageFailed, SteleError, StoreError
from .registry import REGISTRY, Resources, StageType, stage
from .store import Artifact, ArtifactStore

__all__ = ["REGISTRY", "Artifact", "ArtifactStore", "Resources", "SpecError", "StageContext",
           "StageFailed", "StageType", "SteleError", "StoreError", "stage"]
