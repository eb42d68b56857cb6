"""Attribution graphs in the store: queue a graph, record its progress and result, read it back.

A row (store.models.AttributionGraph) is both the graph and its job. The graph JSON is stored
zlib-compressed (a 32-token graph's JSON is megabytes of repetitive keys, ~10x smaller
compressed). Claiming, heartbeats and failures go through the shared lease machinery (app.leases)
in the worker; what is here needs no app code.
"""

from __future__ import annotations

import secrets
import zlib
from datetime import datetime

import orjson
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.errors import NotFound
from store.models import AttributionGraph, JobStatus, utcnow


def new_slug() -> str:
    """A random permalink (12 hex digits)."""
    return secrets.token_hex(6)


def pack(data: dict) -> bytes:
    return zlib.compress(orjson.dumps(data), 6)


def unpack(blob: bytes | None) -> dict | None:
    return None if blob is None else orjson.loads(zlib.decompress(blob))


def queue_graph(session: Session, model: str, set_name: str, set_path: str, prompt: str, config: dict,
                requested_by: str | None = None, status: str = JobStatus.queued.value) -> AttributionGraph:
    """Add a graph row (queued for a worker, or `running` for a computation that starts now); the
    caller commits."""
    row = AttributionGraph(slug=new_slug(), model=model, set_name=set_name, set_path=set_path, prompt=prompt,
                           config=config, status=status, requested_by=requested_by, progress=0.0,
                           started_at=utcnow() if status == JobStatus.running.value else None)
    session.add(row)
    session.flush()
    return row


def set_progress(session: Session, graph_id: int, progress: float, worker_id: str | None = None) -> bool:
    """Record progress (0..1) and commit; with worker_id only while the row is still that worker's
    (False otherwise: the lease was lost)."""
    cond = [AttributionGraph.id == graph_id, AttributionGraph.status == JobStatus.running.value]
    if worker_id is not None:
        cond.append(AttributionGraph.lease_owner == worker_id)
    n = session.execute(update(AttributionGraph).where(*cond).values(progress=float(progress))).rowcount
    session.commit()
    return bool(n)


def store_result(session: Session, graph_id: int, data: dict, replacement: float, completeness: float,
                 seconds: float, worker_id: str | None = None) -> bool:
    """Mark a running graph done with its JSON and scores (the caller commits); with worker_id only
    while the row is that worker's. False: it is not (the caller should roll back)."""
    cond = [AttributionGraph.id == graph_id, AttributionGraph.status == JobStatus.running.value]
    if worker_id is not None:
        cond.append(AttributionGraph.lease_owner == worker_id)
    n = session.execute(update(AttributionGraph).where(*cond).values(
        status=JobStatus.done.value, progress=1.0, graph=pack(data), replacement_score=float(replacement),
        completeness_score=float(completeness), seconds=float(seconds), n_nodes=len(data["nodes"]),
        n_links=len(data["links"]), error=None, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None)).rowcount
    return bool(n)


def mark_failed(session: Session, graph_id: int, error: str) -> None:
    """A graph computed in the foreground (no lease) that failed; the caller commits."""
    session.execute(update(AttributionGraph).where(AttributionGraph.id == graph_id).values(
        status=JobStatus.failed.value, error=error[:4000], finished_at=utcnow()))


def cancel_graph(session: Session, graph_id: int) -> bool:
    """Cancel a queued or running graph (the caller commits); False when it had already ended. A
    worker computing it notices at its next progress write (set_progress finds the row no longer
    running) and stops; store_result refuses it too."""
    n = session.execute(update(AttributionGraph).where(
        AttributionGraph.id == graph_id,
        AttributionGraph.status.in_((JobStatus.queued.value, JobStatus.running.value))).values(
        status=JobStatus.cancelled.value, finished_at=utcnow(), lease_owner=None, lease_expires_at=None)).rowcount
    session.flush()
    return bool(n)


def get_graph(session: Session, slug: str) -> AttributionGraph:
    row = session.scalar(select(AttributionGraph).where(AttributionGraph.slug == slug))
    if row is None:
        raise NotFound(f"no graph {slug!r}", "GET /api/v1/graphs lists them")
    return row


def list_graphs(session: Session, limit: int = 50, offset: int = 0, status: str | None = None) -> list[AttributionGraph]:
    """Newest first, without loading the graph blobs' contents into dicts."""
    q = select(AttributionGraph).order_by(AttributionGraph.id.desc()).limit(limit).offset(offset)
    if status:
        q = q.where(AttributionGraph.status == status)
    return list(session.scalars(q))


def count_graphs(session: Session, status: str | None = None) -> int:
    q = select(func.count()).select_from(AttributionGraph)
    if status:
        q = q.where(AttributionGraph.status == status)
    return int(session.scalar(q) or 0)


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def graph_summary(row: AttributionGraph) -> dict:
    """A graph as lists show it: everything but the graph JSON (and no worker host names)."""
    return {"slug": row.slug, "model": row.model, "set_name": row.set_name, "prompt": row.prompt,
            "config": row.config, "status": row.status, "progress": row.progress, "error": row.error,
            "replacement_score": row.replacement_score, "completeness_score": row.completeness_score,
            "n_nodes": row.n_nodes, "n_links": row.n_links, "seconds": row.seconds,
            "requested_by": row.requested_by, "created_at": _iso(row.created_at),
            "started_at": _iso(row.started_at), "finished_at": _iso(row.finished_at)}


def published_layers(session: Session, model: str, folders: dict[int, str], set_name: str | None = None) -> dict[int, str]:
    """layer -> the name of the published SAE of that layer's transcoder.

    Exact matches first: the SAE published from the set's own folder for the layer (folders:
    layer -> absolute folder), or the one published as that block of the set named set_name
    (`publish-set` records {"transcoder_set": {"name", "layer"}} in its config). When the set has
    any exact match, only exact matches count: another SAE at mlp_in.L is another dictionary, and
    its latent i says nothing of this set's latent i. Only a set none of whose blocks is known to
    be published (its folders moved, say) falls back to a ready SAE of the same model (LM name or
    source) reading mlp_in.L that is no other set's block. Layers with no match are left out."""
    from store.models import LM, SAE, SAEStatus

    sites = {f"mlp_in.{layer}": layer for layer in folders}
    rows = session.execute(select(SAE.name, SAE.site, SAE.weights_path, SAE.config, LM.name, LM.source)
                           .join(LM, SAE.lm_id == LM.id)
                           .where(SAE.status == SAEStatus.ready.value, SAE.site.in_(list(sites)))
                           .order_by(SAE.id)).all()
    loose: dict[int, str] = {}
    exact: dict[int, str] = {}
    for name, site, weights, config, lm_name, lm_source in rows:
        layer = sites[site]
        member = (config or {}).get("transcoder_set") or {}
        if weights and folders.get(layer) and str(weights).rstrip("/") == str(folders[layer]).rstrip("/"):
            exact[layer] = name
        elif set_name and member.get("name") == set_name and member.get("layer") == layer:
            exact.setdefault(layer, name)
        elif member:  # a block of another published set: another dictionary
            continue
        elif model in (lm_name, lm_source):
            loose.setdefault(layer, name)
    return exact or loose


def set_graph_data(session: Session, graph_id: int, data: dict) -> None:
    """Replace a finished graph's JSON, e.g. with a caption (metadata.caption) and preset pins and
    supernodes (qParams.pinnedIds, qParams.supernodes) that the graph page shows when its URL
    names none; the caller commits."""
    session.execute(update(AttributionGraph).where(AttributionGraph.id == graph_id).values(
        graph=pack(data), n_nodes=len(data["nodes"]), n_links=len(data["links"])))
