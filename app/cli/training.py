"""`train` (here or --submit to the queue), `trainer-worker` and `runs`."""

from __future__ import annotations

import json
from pathlib import Path

from app.cli.flags import build_config, load_toml
from store.errors import AtlasError

# TrainConfig fields a submitted run carries over (as RunSpec fields); the rest are set by the worker.
SUBMIT_FIELDS = {"model": "model", "site": "sites", "arch": "arch", "width": "width", "k": "k", "tokens": "tokens",
                 "batch_size": "batch_size", "lr": "lr", "corpus": "corpus", "text_field": "text_field",
                 "ctx_len": "ctx_len", "eval_fraction": "eval_fraction", "seed": "seed",
                 "l1_coefficient": "l1_coefficient", "l0_coefficient": "l0_coefficient", "device": "device",
                 "lm_dtype": "lm_dtype", "skip_connection": "skip_connection"}
SUBMIT_ONLY = ("name", "analyze_tokens", "gpus", "priority", "description", "set_publish")


def cmd_train(args, extra: dict) -> int:
    from trainer.config import TrainConfig
    from trainer.sources import check_train_sites

    values = {}
    if args.config:
        data = load_toml(args.config)
        values.update(data.get("train", data))
    values.update(extra)
    if args.submit:
        return submit_run(args, values)
    for flag in SUBMIT_ONLY:
        if getattr(args, flag) is not None:
            raise AtlasError(f"--{flag.replace('_', '-')} only applies with --submit")
    cfg = build_config(TrainConfig, values)
    if not getattr(cfg, "activations", None):
        check_train_sites(cfg.model, cfg.site)  # before torch and the weights: a bad site fails at once
    from trainer.train import train

    folders = train(cfg)
    if folders:
        print_metrics_table(folders)
        for f in folders:
            print(f"saved {f}")
        print_transcoder_sets(cfg.out)
    return 0


def print_transcoder_sets(out: Path) -> None:
    """One line per transcoder set the run wrote: its blocks and the CE with all of them spliced in."""
    from trainer.transcoders import load_transcoder_set

    for path in sorted(Path(out).glob("transcoder_set*.json")):
        tset = load_transcoder_set(path, complete=False)
        m = tset.metrics
        line = f"transcoder set {path}: {len(tset.layers)} of {tset.n_layers} blocks"
        if isinstance(m.get("ce_recovered"), (int, float)):
            ci = m.get("ce_recovered_ci95")
            line += f", all spliced in at once: CE recovered {m['ce_recovered']:.1%}"
            line += f" ± {ci:.1%}" if isinstance(ci, (int, float)) else ""
            line += f", Δ LM loss {m['delta_lm_loss']:.4f} over {m['ce_contexts']} contexts"
        print(line)


def submit_run(args, values: dict) -> int:
    """`sae-atlas train --submit ...`: validate and queue the run for a trainer worker."""
    from pydantic import ValidationError

    from store.db import check_schema, session_scope
    from app.runs.service import submit
    from app.runs.spec import RunSpec, validate_spec
    from trainer.config import TrainConfig

    cfg = build_config(TrainConfig, values)  # parses and type-checks the flags as for a local run
    unsupported = sorted(k.replace("_", "-") for k in values if k.replace("-", "_") not in SUBMIT_FIELDS)
    if unsupported:
        raise AtlasError(f"--{', --'.join(unsupported)} cannot be used with --submit",
                         "a trainer worker sets its own output folder, checkpoints and logging")
    data = {SUBMIT_FIELDS[k]: getattr(cfg, k) for k in (k.replace("-", "_") for k in values)}
    for key in ("model", "corpus"):  # a path typed here is relative to this shell's folder
        value = data.get(key)
        if isinstance(value, (str, Path)) and str(value).startswith(("./", "../")) and Path(value).exists():
            data[key] = str(Path(value).resolve())
    for flag in SUBMIT_ONLY:
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'run'}: {e['msg'].removeprefix('Value error, ')}"
                            for e in exc.errors())
        raise AtlasError(f"invalid run: {reasons}") from None
    spec = validate_spec(spec)  # the model, its sites and the corpus, before the database is asked
    check_schema()
    with session_scope() as session:
        run = submit(session, spec, requested_by="cli")
        run_id, name = run.id, run.name
    print(f"queued run {run_id} ({name}); a trainer worker (`sae-atlas trainer-worker`) will pick it up. "
          f"Follow it with `sae-atlas runs show {run_id}` or at /runs/{run_id}.")
    return 0


def cmd_trainer_worker(args) -> int:
    from store.db import check_schema, get_engine
    from app.runs.worker import TrainerWorker

    for flag, value in (("--gpus", args.gpus), ("--max-runs", args.max_runs)):
        if value is not None and value < 1:
            raise AtlasError(f"{flag} must be at least 1")
    check_schema()
    return TrainerWorker(get_engine(), gpus=args.gpus, once=args.once, max_runs=args.max_runs).serve()


def cmd_runs(args) -> int:
    from store.db import check_schema, session_scope
    from app.runs import service

    check_schema()
    with session_scope() as session:
        if args.runs_command == "cancel":
            service.cancel(session, args.id)
            print(f"run {args.id} cancelled")
            return 0
        if args.runs_command == "show":
            run = service.get(session, args.id)
            d = service.run_dict(run, service.published_saes(session, run.id))
            print(json.dumps(d, indent=1, default=str))
            return 0
        runs, total = service.recent(session, args.limit, 0, args.status)
        print("  ".join(f"{k}: {v}" for k, v in sorted(service.counts(session).items())) or "no runs")
        for r in runs:
            print(f"{r.id:>6} {r.status:9} {r.progress:6.1%} {r.name:32} attempts={r.attempts} {(r.error or '')[:80]}")
    return 0


def print_metrics_table(folders: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [("fvu", "FVU", "{:.4f}"), ("explained_variance", "expl. var", "{:.1%}"), ("l0", "L0", "{:.1f}"),
            ("dead_frac", "dead", "{:.1%}"), ("dense_frac", "dense", "{:.1%}"), ("ce_recovered", "CE recovered", "{:.1%}"),
            ("delta_lm_loss", "Δ LM loss", "{:.4f}"), ("mse", "MSE", "{:.4g}")]
    # the 95% confidence intervals of the spliced-in LM loss, shown as "value ± half-width"
    intervals = {"ce_recovered": ("ce_recovered_ci95", "{:.1%}"), "delta_lm_loss": ("delta_lm_loss_ci95", "{:.4f}")}
    table = Table(title="held-out evaluation")
    table.add_column("SAE")
    for _, title, _ in cols:
        table.add_column(title, justify="right")
    contexts = set()

    def cell(m: dict, key: str, fmt: str) -> str:
        if not isinstance(m.get(key), (int, float)):
            return "–"
        text = fmt.format(m[key])
        ci_key, ci_fmt = intervals.get(key, (None, None))
        if ci_key and isinstance(m.get(ci_key), (int, float)) and m[ci_key] == m[ci_key]:
            text += " ± " + ci_fmt.format(m[ci_key])
        return text

    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        if m.get("ce_contexts"):
            contexts.add(m["ce_contexts"])
        table.add_row(folder.name, *[cell(m, k, fmt) for k, _, fmt in cols])
    if contexts:
        table.caption = (f"± : 95% confidence interval over {', '.join(map(str, sorted(contexts)))} held-out contexts")
    Console(stderr=False).print(table)
