"""Explain: each shown item's sources and one reason a customer can read, from the anchors the sources kept."""

from __future__ import annotations

import numpy as np

from chain.types import Context, Item, Scored
from models.features import SOURCES
from models.snapshot import Snapshot

POPULAR_REASON = "popular in the last 30 days"


def explain(scored: Scored, positions: np.ndarray, ctx: Context, snapshot: Snapshot) -> list[Item]:
    c = scored.candidates
    session = set(ctx.session.tolist())
    out = []
    for p in positions.tolist():
        sources = c.proposed_by(p) or ("popularity",)
        best = (
            "content"
            if ctx.query.query and "content" in sources
            else min(sources, key=lambda s: c.ranks[p, SOURCES.index(s)])
        )
        item = int(c.items[p])
        out.append(
            Item(
                item_id=str(snapshot.item_ids[item]),
                description=str(snapshot.descriptions[item]),
                score=float(scored.scores[p]),
                sources=sources,
                reason=reason(
                    best,
                    int(c.anchors[p, SOURCES.index(best)]),
                    int(scored.ui_times_bought[p]),
                    session,
                    ctx,
                    snapshot,
                ),
            )
        )
    return out


def reason(source: str, anchor: int, times: int, session: set[int], ctx: Context, snapshot: Snapshot) -> str:
    name = str(snapshot.descriptions[anchor]).lower() if anchor >= 0 else ""
    if source == "history":
        return f"you bought this {times} times before" if times > 1 else "you bought this before"
    if source == "cf":
        return f"bought together with {name}" if name else "popular with customers like you"
    if source == "content":
        if ctx.query.query:
            return f"matches “{ctx.query.query}”"
        if not name:
            return "like what you browse"
        verb = "viewed" if anchor in ctx.viewed_only else ("added" if anchor in session else "bought")
        return f"similar to {name} you {verb}"
    return POPULAR_REASON
