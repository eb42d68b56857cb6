"""`embed-explanations`: give explanations stored without a search vector one (semantic search)."""

from __future__ import annotations


def cmd_embed_explanations(args) -> int:
    from store.db import check_schema, get_engine
    from trainer.interpret.backfill import embed_missing
    from trainer.interpret.embedder import check_embedder

    engine = get_engine()
    check_schema(engine)
    result = embed_missing(engine, check_embedder(), sae_name=args.sae, chunk=args.chunk, replace=args.replace)
    scope = f"SAE {args.sae}" if args.sae else "all SAEs"
    print(f"embedded {result.embedded:,} explanations of {scope} with {result.model} "
          f"({result.already:,} already had a vector; {result.remaining:,} still without)")
    return 0
