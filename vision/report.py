"""The run report's section for ``vision.features``: its artifacts are in the feature layout of
:mod:`pipeline.features`, so the engine's generic feature section (listed items, and rejected ones
by kind and reason) is the one it gets.

Registered through the ``stele.report`` entry-point group.
"""

from __future__ import annotations

from pipeline.report import feature_items, report_section

report_section("vision.features")(feature_items)
report_section("vision.video_features")(feature_items)
