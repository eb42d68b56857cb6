"""`map`: make a published SAE's map again (labels from its current explanations, or other settings)."""

from __future__ import annotations

from app.cli.flags import add_dataclass_flags, build_config


def add_parsers(sub) -> None:
    from trainer.structure.layout import MapConfig

    p = sub.add_parser("map", help="make a published SAE's map again (after new explanations, or with other settings)",
                       description="Lay out, cluster and label the latents of a published SAE again from the store "
                                   "(UMAP of its decoder directions, Leiden on cosine and co-firing, labels from the "
                                   "current explanations); publishing makes the first map. Page: /saes/NAME/map.")
    p.add_argument("name", help="name of a published SAE")
    add_dataclass_flags(p, MapConfig)


def cmd_map(args) -> int:
    from trainer.structure.layout import MapConfig
    from trainer.structure.remap import remap_published

    values = {k: v for k, v in vars(args).items() if k not in {"name", "command"}}
    cfg = build_config(MapConfig, values)
    try:
        cfg.validate()
    except ValueError as exc:
        from store.errors import AtlasError

        raise AtlasError(str(exc), "see sae-atlas map --help for the ranges") from None
    s = remap_published(args.name, cfg)
    print(f"mapped {s['latents']:,} latents of {args.name} into {s['clusters']} clusters in {s['seconds']:.1f} s")
    for label in s["labels"]:
        print(f"  {label}")
    print(f"  page: /saes/{args.name}/map")
    return 0
