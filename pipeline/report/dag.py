"""The run's DAG as the report draws it: the edges between stages, their dependency order, and a
left-to-right layout by topological level for the page's inline SVG.

Edges come from each artifact's manifest (inputs by key, exact for what ran or was cached) and, for
stages that left no artifact, from the pipeline file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .page import StageView

STATUS_COLOURS = {  # fill colours of the DAG nodes and status badges
    "ran": "#2e9d5b", "cached": "#3a78c2", "failed": "#c8372d", "skipped": "#d49a1c",
    "interrupted": "#d46a1c", "excluded": "#9aa0a6", "pending": "#9aa0a6", "running": "#7b5cc4",
}


@dataclass
class DagNode:
    name: str
    type: str
    status: str
    x: float
    y: float
    colour: str


@dataclass
class Dag:
    nodes: list[DagNode]
    edges: list[dict[str, Any]]   # {"from", "to", "role", "d": SVG path}
    width: float
    height: float
    node_w: float
    node_h: float
    note: str = ""


def resolve_inputs(stages: list[StageView], spec_inputs: dict[str, dict[str, str]]) -> None:
    """Edges of the DAG. An artifact's manifest names its inputs by key, which is exact for what
    ran or was cached; stages without an artifact (failed, skipped, excluded) take theirs from the
    pipeline file, which may have been edited since the run."""
    by_key: dict[str, list[str]] = {}
    for sv in stages:
        by_key.setdefault(sv.key, []).append(sv.name)
    names = {sv.name for sv in stages}
    for sv in stages:
        if sv.manifest is not None:
            for role, key in sv.manifest.get("inputs", {}).items():
                ups = [u for u in by_key.get(key, []) if u != sv.name]
                for up in ups:  # two stages of identical type, parameters and inputs share a key
                    sv.inputs[role if len(ups) == 1 else f"{role} ({up})"] = up
        elif sv.name in spec_inputs:
            sv.inputs = {r: up for r, up in spec_inputs[sv.name].items() if up in names}
        else:
            sv.notes.append("its inputs are unknown: it left no artifact and the pipeline file "
                            "could not be read")


def topological(stages: list[StageView], file_order: list[str]) -> list[StageView]:
    """Stages in dependency order, ties in the pipeline file's order (the run record's stages are
    stored sorted by name, which says nothing about the pipeline), else by name."""
    import networkx as nx

    rank = {n: i for i, n in enumerate(file_order)}
    by_name = {sv.name: sv for sv in stages}
    g = nx.DiGraph()
    g.add_nodes_from(by_name)
    g.add_edges_from((up, sv.name) for sv in stages for up in sv.inputs.values() if up in by_name)
    try:
        order = list(nx.lexicographical_topological_sort(
            g, key=lambda n: (rank.get(n, len(rank)), n)))
    except nx.NetworkXUnfeasible:
        order = sorted(by_name, key=lambda n: (rank.get(n, len(rank)), n))
    return [by_name[n] for n in order]


def layout_dag(stages: list[StageView], node_w: float = 190, node_h: float = 44,
               gap_x: float = 60, gap_y: float = 18, pad: float = 10) -> Dag:
    """Left-to-right layout by topological level (longest path from a source), nodes of a level
    ordered by the mean position of their inputs so that edges cross less; edges are cubic curves."""
    import networkx as nx

    g = nx.DiGraph()
    order = {sv.name: i for i, sv in enumerate(stages)}
    g.add_nodes_from(order)
    for sv in stages:
        for up in sv.inputs.values():
            if up in order:
                g.add_edge(up, sv.name)
    note = ""
    try:
        levels = [sorted(gen, key=order.__getitem__) for gen in nx.topological_generations(g)]
    except nx.NetworkXUnfeasible:  # cannot happen for a validated pipeline; draw one column
        levels, note = [list(order)], "the recorded inputs form a cycle; edges drawn as recorded"
    pos: dict[str, tuple[float, float]] = {}
    for li, level in enumerate(levels):
        if li:
            def bary(n: str) -> float:
                ps = [pos[p][1] for p in g.predecessors(n) if p in pos]
                return sum(ps) / len(ps) if ps else float(order[n])
            level.sort(key=lambda n: (bary(n), order[n]))
        for i, n in enumerate(level):
            pos[n] = (pad + li * (node_w + gap_x), pad + i * (node_h + gap_y))
    by_name = {sv.name: sv for sv in stages}
    nodes = [DagNode(n, by_name[n].type, by_name[n].status, x, y,
                     STATUS_COLOURS.get(by_name[n].status, "#9aa0a6")) for n, (x, y) in pos.items()]
    edges = []
    for sv in stages:
        for role, up in sv.inputs.items():
            if up not in pos:
                continue
            x1, y1 = pos[up][0] + node_w, pos[up][1] + node_h / 2
            x2, y2 = pos[sv.name][0] - 6, pos[sv.name][1] + node_h / 2  # room for the arrowhead
            mid = (x1 + x2) / 2
            edges.append({"from": up, "to": sv.name, "role": role,
                          "d": f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} "
                               f"{x2:.1f},{y2:.1f}"})
    width = pad * 2 + max(1, len(levels)) * (node_w + gap_x) - gap_x
    height = pad * 2 + max((len(lv) for lv in levels), default=1) * (node_h + gap_y) - gap_y
    return Dag(nodes, edges, width, height, node_w, node_h, note)
