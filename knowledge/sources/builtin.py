"""stele's built-in knowledge sources, registered through the ``stele.sources`` entry point like
any third-party source (importing this module registers them)."""

from . import countryinfo, graph, hf, pykeen, rdf, triples, wikidata, wordnet  # noqa: F401
