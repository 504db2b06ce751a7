"""The knowledge package's stage types (registered through the ``stele.stages`` entry point)."""

from . import embed, evaluate, ingest, link  # noqa: F401
