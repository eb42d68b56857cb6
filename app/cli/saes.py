"""`analyze`, `publish`, `publish-set`, `import`, `add` and `export`: from an SAE folder to browsable dashboards, and back out."""

from __future__ import annotations

import json
from pathlib import Path

from app.cli.flags import build_config, load_toml
from store.errors import AtlasError


def cmd_analyze(args, extra: dict) -> int:
    from trainer.analyze import AnalyzeConfig, analyze

    values = {}
    if args.config:
        data = load_toml(args.config)
        values.update(data.get("analyze", data))
    values.update(extra)
    cfg = build_config(AnalyzeConfig, values, {"sae_dir": Path(args.sae_dir)})
    if args.publish and not args.name:
        raise AtlasError("--publish needs --name", "e.g. --name my-sae")
    if args.publish:  # fail before the long analysis, not after it
        from store.publish import check_can_publish

        check_can_publish(args.name, args.replace)
    out = analyze(cfg)
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings"]
    print(f"analysed {summary['analysis']['n_tokens']:,} tokens for {summary['sae']['d_sae']:,} latents in "
          f"{t['total_s']:.1f} s ({len(summary['dead'])} never fired, {len(summary['dense'])} dense); results in {out}")
    if args.publish:
        return publish_folder(Path(args.sae_dir), args.name, args.replace, "")
    return 0


def publish_folder(sae_dir: Path, name: str, replace: bool, description: str) -> int:
    import time

    from trainer.publish import publish

    start = time.time()
    sae_id = publish(sae_dir, name, replace=replace, description=description)
    print(f"published {name} (id {sae_id}) in {time.time() - start:.1f} s")
    return 0


def cmd_publish(args) -> int:
    folder = Path(args.sae_dir).expanduser()
    if folder.name.startswith("transcoder_set") and folder.suffix == ".json" or (
            folder.is_dir() and any(folder.glob("transcoder_set*.json"))):
        raise AtlasError(f"{folder} is a transcoder set, not one SAE",
                         f"publish every block with `sae-atlas publish-set {folder} --prefix {args.name}`")
    return publish_folder(folder, args.name, args.replace, args.description or "")


def cmd_publish_set(args) -> int:
    import time

    from trainer.transcoders.publish_set import DEFAULT_TOKENS, publish_transcoder_set

    path = Path(args.set_path).expanduser()
    if not path.exists():
        raise AtlasError(f"transcoder set {path} does not exist", "point at a run folder or its transcoder_set.json")
    analysis = {"device": args.device} | ({"corpus": args.corpus} if args.corpus else {})
    started, timings = time.time(), {}
    names = publish_transcoder_set(path, args.prefix, tokens=args.tokens or DEFAULT_TOKENS, light=args.light,
                                   replace=args.replace, name=args.name, analysis=analysis, timings=timings)
    name = args.name or args.prefix
    print(f"published {len(names)} blocks ({names[0]} … {names[-1]}) in {time.time() - started:.1f} s "
          f"(LM pass {timings['lm_pass_s']:.1f} s, analyses {timings['analyses_s']:.1f} s, publish "
          f"{timings['publish_s']:.1f} s); set registered as {name}: sae-atlas graph --set {name} \"PROMPT\"")
    return 0


def cmd_import(args) -> int:
    from trainer.importer import import_sae

    folder = import_sae(Path(args.source), model=args.model, site=args.site, name=args.name, overwrite=args.overwrite,
                        output_site=args.output_site)
    print(f"imported into {folder}")
    return 0


def cmd_export(args) -> int:
    from trainer.formats import export_folder

    out = export_folder(Path(args.sae_dir), args.format, Path(args.out), model=args.model)
    loader = {"saelens": "sae_lens.SAE.load_from_disk", "sparsify": "sparsify.SparseCoder.load_from_disk"}[args.format]
    print(f"exported to {out} (load it with {loader})")
    return 0


def cmd_add(args) -> int:
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.importer import import_sae
    from store.publish import check_can_publish

    check_can_publish(args.name, args.replace)
    folder = import_sae(Path(args.source), model=args.model, site=args.site, name=args.name, overwrite=True,
                        output_site=args.output_site)
    analyze(AnalyzeConfig(sae_dir=folder, tokens=args.tokens, corpus=args.corpus, restart=True))
    return publish_folder(folder, args.name, args.replace, args.description or "")
