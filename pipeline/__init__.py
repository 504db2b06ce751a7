"""stele's pipeline engine: YAML DAGs of registered stages, run on Ray, cached in a content-addressed store.

The public API for writing stages::

    from pipeline import Input, StageContext, stage
"""

from .context import StageContext
from .errors import SpecError, StageFailed, SteleError, StoreError
from .registry import REGISTRY, Input, Resources, StageType, stage
from .store import Artifact, ArtifactStore

__all__ = ["REGISTRY", "Artifact", "ArtifactStore", "Input", "Resources", "SpecError", "StageContext",
           "StageFailed", "StageType", "SteleError", "StoreError", "stage"]
