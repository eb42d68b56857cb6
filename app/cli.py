"""The `sae-atlas` command.

Every user mistake ends in one line on stderr (`error: what is wrong (what to do)`) and a non-zero
exit status, never a traceback; set SAE_ATLAS_DEBUG=1 to see tracebacks of unexpected errors.
Training and analysis flags are generated from their dataclass configs, so a flag, a TOML key and
a config field always have the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
import types
import typing
from pathlib import Path

from app.errors import AtlasError

DEMO_SAE = "smollm2-135m-resid15-topk"


# --- dataclass -> argparse ---------------------------------------------------------------------

def _field_type(f: dataclasses.Field, hints: dict) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a dataclass field."""
    tp = hints[f.name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _parse_scalar(tp: type, text: str, flag: str):
    try:
        if tp is bool:
            low = str(text).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(float(text)) if "e" in str(text).lower() else int(text)
        return tp(text)
    except (TypeError, ValueError):
        raise AtlasError(f"{flag}: {text!r} is not a valid {tp.__name__}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_list, _ = _field_type(f, hints)
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "").replace("%", "%%")
        if tp is bool and not is_list:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            metavar = f.name.upper() + ("[,…]" if is_list else "")
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the convention used by our configs)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def build_config(cls, values: dict, required: dict | None = None):
    """Make a dataclass from flag/TOML values (strings, numbers or lists), validating every key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = dict(required or {})
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise AtlasError(f"unknown option {key!r}", f"valid options: {known}")
        tp, is_list, optional = _field_type(fields[name], hints)
        flag = "--" + name.replace("_", "-")
        if raw is None:
            if not optional:
                raise AtlasError(f"{flag} cannot be empty")
            kwargs[name] = None
            continue
        if is_list:
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(",") if p.strip()]
            if not items and name != "matryoshka_prefixes":
                raise AtlasError(f"{flag} needs at least one value")
            kwargs[name] = [_parse_scalar(tp, str(i).strip(), flag) if not isinstance(i, tp) else i for i in items]
        elif isinstance(raw, str) and optional and raw.lower() in ("none", "null", ""):
            kwargs[name] = None
        else:
            kwargs[name] = raw if isinstance(raw, tp) and not (tp is int and isinstance(raw, bool)) else _parse_scalar(tp, raw, flag)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise AtlasError(f"incomplete options: {exc}") from None


def _load_toml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise AtlasError(f"config file {p} does not exist", "check the path")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise AtlasError(f"config file {p} is not valid TOML: {exc}") from None
    # Accept both a flat file and one with a [train] / [analyze] table.
    return data


# --- commands ----------------------------------------------------------------------------------

def cmd_db(args) -> int:
    from app.db import check_schema, current_revision, describe, get_engine, head_revision, upgrade

    engine = get_engine()
    if args.db_command == "upgrade":
        rev = upgrade(engine)
        print(f"database {describe(engine)} is at schema revision {rev} (head)")
    elif args.db_command == "current":
        print(f"{describe(engine)}: revision {current_revision(engine) or 'none'}; head is {head_revision()}")
    else:
        check_schema(engine)
        print(f"database {describe(engine)} is up to date")
    return 0


def cmd_settings(args) -> int:
    from app.settings import Settings, get_settings

    s = get_settings()
    for name in Settings.model_fields:
        value = getattr(s, name)
        if name in ("openai_api_key", "database_url") and value:
            value = "(set)"
        print(f"{name:22} {value}")
    return 0


def cmd_models(args) -> int:
    from trainer.lm import ALIASES

    for name, alias in ALIASES.items():
        print(f"{name:16} {alias.description}")
    print("Any Hugging Face id (org/name), local transformers folder or .gguf file also works.")
    return 0


def cmd_sites(args) -> int:
    from trainer.lm import load_lm

    lm = load_lm(args.model, "cpu", "float32")
    print(f"{lm.name}: {lm.n_layers} blocks, d_model {lm.d_model}; sites: resid_post.L, mlp_out.L, attn_out.L for L in 0..{lm.n_layers - 1}")
    return 0


def cmd_train(args, extra: dict) -> int:
    from trainer.train import TrainConfig, train

    values = {}
    if args.config:
        data = _load_toml(args.config)
        values.update(data.get("train", data))
    values.update(extra)
    if args.submit:
        return submit_run(args, values)
    for flag in ("name", "analyze_tokens", "gpus", "priority", "description"):
        if getattr(args, flag) is not None:
            raise AtlasError(f"--{flag.replace('_', '-')} only applies with --submit")
    cfg = build_config(TrainConfig, values)
    folders = train(cfg)
    if folders:
        print_metrics_table(folders)
        for f in folders:
            print(f"saved {f}")
    return 0


# TrainConfig fields a submitted run carries over (as RunSpec fields); the rest are set by the worker.
SUBMIT_FIELDS = {"model": "model", "site": "sites", "arch": "arch", "width": "width", "k": "k", "tokens": "tokens",
                 "batch_size": "batch_size", "lr": "lr", "corpus": "corpus", "text_field": "text_field",
                 "ctx_len": "ctx_len", "eval_fraction": "eval_fraction", "seed": "seed",
                 "l1_coefficient": "l1_coefficient", "l0_coefficient": "l0_coefficient", "device": "device",
                 "lm_dtype": "lm_dtype"}


def submit_run(args, values: dict) -> int:
    """`sae-atlas train --submit ...`: validate and queue the run for a trainer worker."""
    from pydantic import ValidationError

    from app.db import check_schema, session_scope
    from app.runs.service import submit
    from app.runs.spec import RunSpec
    from trainer.train import TrainConfig

    cfg = build_config(TrainConfig, values)  # parses and type-checks the flags as for a local run
    unsupported = sorted(k.replace("_", "-") for k in values if k.replace("-", "_") not in SUBMIT_FIELDS)
    if unsupported:
        raise AtlasError(f"--{', --'.join(unsupported)} cannot be used with --submit",
                         "a trainer worker sets its own output folder, checkpoints and logging")
    data = {SUBMIT_FIELDS[k]: getattr(cfg, k) for k in (k.replace("-", "_") for k in values)}
    for flag in ("name", "analyze_tokens", "gpus", "priority", "description"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'run'}: {e['msg'].removeprefix('Value error, ')}"
                            for e in exc.errors())
        raise AtlasError(f"invalid run: {reasons}") from None
    check_schema()
    with session_scope() as session:
        run = submit(session, spec, requested_by="cli")
        run_id, name = run.id, run.name
    print(f"queued run {run_id} ({name}); a trainer worker (`sae-atlas trainer-worker`) will pick it up. "
          f"Follow it with `sae-atlas runs show {run_id}` or at /runs/{run_id}.")
    return 0


def cmd_trainer_worker(args) -> int:
    from app.db import check_schema, get_engine
    from app.runs.worker import TrainerWorker

    for flag, value in (("--gpus", args.gpus), ("--max-runs", args.max_runs)):
        if value is not None and value < 1:
            raise AtlasError(f"{flag} must be at least 1")
    check_schema()
    return TrainerWorker(get_engine(), gpus=args.gpus, once=args.once, max_runs=args.max_runs).serve()


def cmd_runs(args) -> int:
    from app.db import check_schema, session_scope
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
    table = Table(title="held-out evaluation")
    table.add_column("SAE")
    for _, title, _ in cols:
        table.add_column(title, justify="right")
    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        table.add_row(folder.name, *[fmt.format(m[k]) if isinstance(m.get(k), (int, float)) else "–" for k, _, fmt in cols])
    Console(stderr=False).print(table)


def cmd_analyze(args, extra: dict) -> int:
    from trainer.analyze import AnalyzeConfig, analyze

    values = {}
    if args.config:
        data = _load_toml(args.config)
        values.update(data.get("analyze", data))
    values.update(extra)
    cfg = build_config(AnalyzeConfig, values, {"sae_dir": Path(args.sae_dir)})
    if args.publish and not args.name:
        raise AtlasError("--publish needs --name", "e.g. --name my-sae")
    if args.publish:  # fail before the long analysis, not after it
        from trainer.publish import check_can_publish

        check_can_publish(args.name, args.replace)
    out = analyze(cfg)
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings"]
    print(f"analysed {summary['analysis']['n_tokens']:,} tokens for {summary['sae']['d_sae']:,} latents in "
          f"{t['total_s']:.1f} s ({len(summary['dead'])} never fired, {len(summary['dense'])} dense); results in {out}")
    if args.publish:
        return _publish(Path(args.sae_dir), args.name, args.replace, "")
    return 0


def _publish(sae_dir: Path, name: str, replace: bool, description: str) -> int:
    import time

    from trainer.publish import publish

    start = time.time()
    sae_id = publish(sae_dir, name, replace=replace, description=description)
    print(f"published {name} (id {sae_id}) in {time.time() - start:.1f} s")
    return 0


def cmd_publish(args) -> int:
    return _publish(Path(args.sae_dir), args.name, args.replace, args.description or "")


def cmd_import(args) -> int:
    from trainer.importer import import_sae

    folder = import_sae(Path(args.source), model=args.model, site=args.site, name=args.name, overwrite=args.overwrite)
    print(f"imported into {folder}")
    return 0


def cmd_add(args) -> int:
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.importer import import_sae
    from trainer.publish import check_can_publish

    check_can_publish(args.name, args.replace)
    folder = import_sae(Path(args.source), model=args.model, site=args.site, name=args.name, overwrite=True)
    analyze(AnalyzeConfig(sae_dir=folder, tokens=args.tokens, corpus=args.corpus, restart=True))
    return _publish(folder, args.name, args.replace, args.description or "")


def cmd_serve(args) -> int:
    import uvicorn

    from app.db import check_schema
    from app.settings import get_settings

    check_schema()
    s = get_settings()
    host, port = args.host or s.host, args.port or s.port
    print(f"SAE Atlas is serving at http://{host}:{port}", flush=True)
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=args.workers,
                log_level=s.log_level.lower(), access_log=False)
    return 0


def cmd_worker(args) -> int:
    from app.autointerp.worker import run_worker
    from app.db import check_schema

    for flag, value in (("--concurrency", args.concurrency), ("--max-jobs", args.max_jobs)):
        if value is not None and value < 1:
            raise AtlasError(f"{flag} must be at least 1")
    if args.grace < 0:
        raise AtlasError("--grace must not be negative")
    check_schema()
    return run_worker(concurrency=args.concurrency, once=args.once, max_jobs=args.max_jobs, backend=args.backend,
                      grace_s=args.grace)


def cmd_explain(args) -> int:
    from app.autointerp.queue import enqueue_for_sae
    from app.db import check_schema, session_scope

    check_schema()
    try:
        indices = [int(i) for i in args.feature.split(",")] if args.feature else None
    except ValueError:
        raise AtlasError(f"--feature {args.feature!r} must be comma-separated latent indices, e.g. 3,17,42") from None
    for flag, v in (("--density-min", args.density_min), ("--density-max", args.density_max)):
        if v is not None and not 0 <= v <= 1:
            raise AtlasError(f"{flag} must be between 0 and 1")
    with session_scope() as session:
        created, skipped = enqueue_for_sae(session, args.sae, indices=indices, density_min=args.density_min,
                                           density_max=args.density_max, priority=args.priority, limit=args.limit,
                                           requested_by="cli")
    print(f"queued {created} explanation jobs for {args.sae} ({skipped} already had a live job)")
    return 0


def cmd_jobs(args) -> int:
    from sqlalchemy import func, select

    from app.autointerp.queue import cancel_job
    from app.db import check_schema, session_scope
    from app.models import Job

    check_schema()
    with session_scope() as session:
        if args.jobs_command == "cancel":
            cancel_job(session, args.id)
            print(f"job {args.id} cancelled")
            return 0
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no jobs")
        q = select(Job).order_by(Job.id.desc()).limit(args.limit)
        if args.status:
            q = q.where(Job.status == args.status)
        for job in session.scalars(q):
            print(f"{job.id:>8} {job.status:9} sae={job.sae_id} feature={job.feature_id} attempts={job.attempts} "
                  f"{(job.error or '')[:80]}")
    return 0


def cmd_keys(args) -> int:
    from app.db import check_schema, session_scope
    from app.security import create_key, list_keys, revoke_key

    check_schema()
    with session_scope() as session:
        if args.keys_command == "create":
            key = create_key(session, args.name)
            print(key)
            print(f"# API key {args.name!r} created; it is shown once. Send it as 'Authorization: Bearer <key>'.", file=sys.stderr)
        elif args.keys_command == "revoke":
            revoke_key(session, args.name)
            print(f"revoked {args.name}")
        else:
            for k in list_keys(session):
                print(f"{k.name:24} {k.prefix}…  created {k.created_at:%Y-%m-%d}  "
                      f"{'revoked' if k.revoked_at else 'active'}")
    return 0


def cmd_demo(args) -> int:
    import subprocess

    from app.demo import build_demo

    build_demo(rebuild=args.rebuild, tokens=args.tokens)
    if args.no_serve:
        return 0
    # An auto-interp worker beside the server, so that "Request an explanation" does something.
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], stdin=subprocess.DEVNULL)
    try:
        args.host, args.port, args.workers = None, None, 1
        return cmd_serve(args)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


# --- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from app import __version__
    from trainer.analyze import AnalyzeConfig
    from trainer.train import TrainConfig

    p = argparse.ArgumentParser(prog="sae-atlas", description="Train, analyse, explain and browse sparse autoencoders.")
    p.add_argument("--version", action="version", version=f"sae-atlas {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database schema: upgrade, current, check")
    db.add_argument("db_command", choices=["upgrade", "current", "check"])
    sub.add_parser("settings", help="print the settings in effect")
    sub.add_parser("models", help="list model aliases")
    sites = sub.add_parser("sites", help="list the activation sites of a model")
    sites.add_argument("--model", default="smollm2-135m")

    train = sub.add_parser("train", help="train an SAE (or a sweep) on a model's activations or a .npy matrix")
    train.add_argument("--config", help="TOML file with the same keys as the flags")
    train.add_argument("--submit", action="store_true",
                       help="queue the run for a trainer worker instead of training here (it is analysed and published too)")
    train.add_argument("--name", help="with --submit: name of the published SAE (a sweep's prefix)")
    train.add_argument("--analyze-tokens", dest="analyze_tokens", type=int, help="with --submit: tokens for the dashboards")
    train.add_argument("--gpus", type=int, help="with --submit: devices for the run (torchrun when more than one)")
    train.add_argument("--priority", type=int, help="with --submit: higher runs first")
    train.add_argument("--description", help="with --submit: shown on the SAE page")
    add_dataclass_flags(train, TrainConfig)

    an = sub.add_parser("analyze", help="compute every latent's dashboard in one pass of the LM")
    an.add_argument("sae_dir", help="SAE folder (ours, SAELens, sparsify or Gemma Scope)")
    an.add_argument("--config", help="TOML file with the same keys as the flags")
    an.add_argument("--publish", action="store_true", help="publish into the store when done")
    an.add_argument("--name", help="name to publish under")
    an.add_argument("--replace", action="store_true", help="replace a published SAE of the same name")
    add_dataclass_flags(an, AnalyzeConfig, skip=("sae_dir",))

    pub = sub.add_parser("publish", help="write an analysed SAE into the store")
    pub.add_argument("sae_dir")
    pub.add_argument("--name", required=True)
    pub.add_argument("--replace", action="store_true")
    pub.add_argument("--description")

    imp = sub.add_parser("import", help="bring an SAELens, Gemma Scope or sparsify SAE into DATA_DIR/saes")
    imp.add_argument("source")
    imp.add_argument("--model", required=True)
    imp.add_argument("--site", help="default: from the SAE's cfg.json")
    imp.add_argument("--name", required=True)
    imp.add_argument("--overwrite", action="store_true")

    add = sub.add_parser("add", help="import + analyze + publish in one command")
    add.add_argument("source")
    add.add_argument("--model", required=True)
    add.add_argument("--site")
    add.add_argument("--name", required=True)
    add.add_argument("--tokens", type=int, default=1_000_000)
    add.add_argument("--corpus", default="pydoc")
    add.add_argument("--replace", action="store_true")
    add.add_argument("--description")

    serve = sub.add_parser("serve", help="run the web explorer and REST API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)

    worker = sub.add_parser("worker", help="run an auto-interp worker")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--max-jobs", type=int, default=None)
    worker.add_argument("--backend", choices=["local", "openai", "instant"], default=None,
                        help="explainer backend (default: SAE_ATLAS_EXPLAINER_BACKEND); instant is a canned "
                             "answer for tests and benchmarks of the queue only")
    worker.add_argument("--grace", type=float, default=30.0,
                        help="seconds running jobs get to finish on SIGTERM before they are released")

    tw = sub.add_parser("trainer-worker", help="run training runs from the store's queue (train, analyze, publish)")
    tw.add_argument("--gpus", type=int, default=None,
                    help="largest run (in devices) this worker takes; default: the CUDA devices present, or 1")
    tw.add_argument("--once", action="store_true", help="exit when the queue has nothing for this worker")
    tw.add_argument("--max-runs", type=int, default=None, help="exit after this many runs")

    runs = sub.add_parser("runs", help="list training runs, show one, or cancel one")
    runs.add_argument("runs_command", choices=["list", "show", "cancel"], nargs="?", default="list")
    runs.add_argument("id", nargs="?", type=int)
    runs.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"])
    runs.add_argument("--limit", type=int, default=20)

    ex = sub.add_parser("explain", help="queue explanation jobs for an SAE's latents")
    ex.add_argument("--sae", required=True)
    ex.add_argument("--feature", help="comma-separated latent indices (default: all, within the density range)")
    ex.add_argument("--density-min", type=float)
    ex.add_argument("--density-max", type=float)
    ex.add_argument("--priority", type=int, default=0)
    ex.add_argument("--limit", type=int)

    jobs = sub.add_parser("jobs", help="list or cancel auto-interp jobs")
    jobs.add_argument("jobs_command", choices=["list", "cancel"], nargs="?", default="list")
    jobs.add_argument("id", nargs="?", type=int)
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)

    keys = sub.add_parser("keys", help="API keys: create NAME, list, revoke NAME")
    keys.add_argument("keys_command", choices=["create", "list", "revoke"])
    keys.add_argument("name", nargs="?")

    demo = sub.add_parser("demo", help="build the demo atlas on the bundled model (first run) and serve it")
    demo.add_argument("--rebuild", action="store_true")
    demo.add_argument("--no-serve", action="store_true")
    demo.add_argument("--tokens", type=int, default=None, help="training tokens (default from app/demo.py)")
    return p


def main(argv: list[str] | None = None) -> int:
    from app.settings import get_settings

    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("SAE_ATLAS_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        settings = get_settings()
        logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
        if not debug:
            for noisy in ("alembic", "httpx", "urllib3", "datasets", "filelock"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.command in ("keys",) and args.keys_command in ("create", "revoke") and not args.name:
            raise AtlasError(f"keys {args.keys_command} needs a NAME")
        if args.command == "jobs" and args.jobs_command == "cancel" and args.id is None:
            raise AtlasError("jobs cancel needs a job id")
        if args.command == "runs" and args.runs_command in ("show", "cancel") and args.id is None:
            raise AtlasError(f"runs {args.runs_command} needs a run id")
        if args.command in ("train", "analyze"):
            from trainer.analyze import AnalyzeConfig
            from trainer.train import TrainConfig

            cls = TrainConfig if args.command == "train" else AnalyzeConfig
            names = {f.name for f in dataclasses.fields(cls)}
            extra = {k: v for k, v in vars(args).items() if k in names}
            return (cmd_train if args.command == "train" else cmd_analyze)(args, extra)
        handler = globals()[f"cmd_{args.command.replace('-', '_')}"]
        return handler(args)
    except AtlasError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected bug: one line unless debugging
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set SAE_ATLAS_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
