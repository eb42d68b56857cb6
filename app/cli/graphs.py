"""`graph --set SET "prompt"`: compute one attribution graph and store it; `graph-worker`: compute
the graphs queued through the API (POST /api/v1/graphs) or the graph form."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from store.errors import AtlasError


def add_parsers(sub) -> None:
    from app.cli.flags import add_dataclass_flags
    from trainer.circuits.attribute import AttributionConfig
    from trainer.circuits.compute import GraphConfig

    g = sub.add_parser("graph", help="compute an attribution graph of a prompt through a transcoder set and store it")
    g.add_argument("prompt", help="the text to attribute (at most --max-tokens tokens)")
    g.add_argument("--set", dest="set_path", required=True, metavar="SET",
                   help="a transcoder set: its run folder, its transcoder_set*.json, or the name publish-set registered")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_dataclass_flags(g, GraphConfig, skip=("attribution",))
    add_dataclass_flags(g, AttributionConfig)

    w = sub.add_parser("graph-worker", help="compute queued attribution graphs from the store")
    w.add_argument("--once", action="store_true", help="compute at most one graph, then exit")
    w.add_argument("--max-graphs", dest="max_graphs", type=int, default=None, help="exit after this many graphs")


def graph_config(values: dict) -> dict:
    """GraphConfig as a dict from flag values (validated by the dataclasses)."""
    from app.cli.flags import build_config
    from trainer.circuits.attribute import AttributionConfig
    from trainer.circuits.compute import GraphConfig

    names = {f.name for f in dataclasses.fields(AttributionConfig)}
    attribution = build_config(AttributionConfig, {k: v for k, v in values.items() if k in names})
    own = {f.name for f in dataclasses.fields(GraphConfig)} - {"attribution"}
    cfg = build_config(GraphConfig, {k: v for k, v in values.items() if k in own})
    cfg.attribution = attribution
    return cfg.to_dict()


def cmd_graph(args) -> int:
    from app.graphs import compute_and_store
    from store.db import check_schema, get_engine

    check_schema()
    from trainer.transcoders.sets import SET_NAME, sets_dir

    path = Path(args.set_path).expanduser()
    if not path.exists() and SET_NAME.fullmatch(args.set_path) and (sets_dir() / args.set_path).is_dir():
        path = sets_dir() / args.set_path  # a registered set's name (sae-atlas publish-set)
    if not path.exists():
        raise AtlasError(f"transcoder set {path} does not exist",
                         "point --set at a run folder, its transcoder_set.json, or a set registered by publish-set")
    config = graph_config(vars(args))

    def echo(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\rattribution: {done}/{total} rows ({100 * done / max(total, 1):.0f}%)", end="", file=sys.stderr, flush=True)

    row = compute_and_store(get_engine(), path, args.prompt, config, echo)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"graph {row.slug}: {row.n_nodes} nodes, {row.n_links} links, replacement {row.replacement_score:.3f}, "
          f"completeness {row.completeness_score:.3f} ({row.seconds:.1f} s) -> /graphs/{row.slug}")
    return 0


def cmd_graph_worker(args) -> int:
    from app.graphs import GraphWorker
    from store.db import check_schema, get_engine

    if args.max_graphs is not None and args.max_graphs < 1:
        raise AtlasError("--max-graphs must be at least 1")
    check_schema()
    return GraphWorker(get_engine(), once=args.once, max_graphs=args.max_graphs).serve()
