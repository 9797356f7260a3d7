"""Reachability and last uses on a :mod:`torch.fx` graph (what the greedy search's replay runs and frees)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import fx

__all__ = ["ancestors", "descendants", "last_uses"]


def descendants(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node that depends on them."""
    return _closure(starts, lambda node: node.users)


def ancestors(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node they depend on."""
    return _closure(starts, lambda node: node.all_input_nodes)


def _closure(starts: Sequence[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen, stack = set(starts), list(starts)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def last_uses(nodes: list[fx.Node], keep: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node of ``nodes``, the values (not in ``keep``) read for the last time by it."""
    last: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for dep in node.all_input_nodes:
            last[dep] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for dep, node in last.items():
        if dep not in keep:
            out.setdefault(node, []).append(dep)
    return out
