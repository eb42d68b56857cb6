"""`relate`: how the latents of two published SAEs correspond (layer, width or seed pair)."""

from __future__ import annotations

from app.cli.flags import add_dataclass_flags, build_config


def add_parsers(sub) -> None:
    from trainer.relate import RelateConfig

    rel = sub.add_parser("relate", help="relate two published SAEs of one model: matches across layers, splits across widths",
                         description="Relate two published SAEs of one model on data (--tokens defaults to "
                                     "SAE_ATLAS_RELATE_TOKENS) and store the relation; its page is /relations/A/B.")
    rel.add_argument("sae_a", help="name of a published SAE")
    rel.add_argument("sae_b", help="name of another published SAE of the same model")
    add_dataclass_flags(rel, RelateConfig)


def cmd_relate(args) -> int:
    from store.settings import get_settings
    from trainer.relate import RelateConfig
    from trainer.relate.published import relate_published

    names = {"sae_a", "sae_b", "command"}
    values = {k: v for k, v in vars(args).items() if k not in names}
    cfg = build_config(RelateConfig, {"tokens": get_settings().relate_tokens, **values})
    rel = relate_published(args.sae_a, args.sae_b, cfg)
    s = rel.summary
    print(f"related {rel.a.name} (A) and {rel.b.name} (B) as a {rel.kind} pair on {s['tokens']:,} tokens "
          f"({s['data']['source']}) in {s['timings']['total_s']:.1f} s; {s['candidates']:,} candidate pairs")
    if rel.kind == "width":
        sp = s["splitting"]
        print(f"  A latents: {sp['parents']['persisted']:,} persisted, {sp['parents']['split']:,} split, "
              f"{sp['parents']['persisted_split']:,} persisted and split (mean {sp['children_per_split'] or 0:.1f} "
              f"children), {sp['parents']['vanished']:,} vanished; links: {sp['links']['direction']:,} by direction, "
              f"{sp['links']['cofiring']:,} by co-firing alone")
        print(f"  B latents: {sp['children']['novel']:,} novel, {sp['children']['reconstruction']:,} reconstruction")
        dm = s["dark_matter"]
        if dm.get("novel_capture") and dm["novel_capture"].get("share") is not None:
            print(f"  B's novel latents capture {dm['novel_capture']['share']:.1%} of A's squared error; "
                  f"per-token error norms correlate at {dm['error_norm_correlation']:.2f}")
    else:
        m = s["matching"]
        print(f"  {m['pairs']:,} one-to-one matches, {m['confirmed']:,} confirmed on data (rho >= "
              f"{s['config']['confirm_rho']}); persistence {m['persistence']:.1%} of A's live latents")
    print(f"  page: /relations/{rel.a.name}/{rel.b.name}")
    return 0
