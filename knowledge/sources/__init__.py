"""Knowledge sources: one interface, a registry, and the built-ins (see base.py for the recipe)."""

from .base import (SOURCES, Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple,
                   build_source, read_lines, source)

__all__ = ["SOURCES", "Entity", "KnowledgeSource", "Quarantine", "Relation", "SourceError",
           "Triple", "build_source", "read_lines", "source"]
