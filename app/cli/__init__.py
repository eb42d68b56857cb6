"""The `sae-atlas` command, one module per group of subcommands:

- flags: config dataclasses as flags and TOML keys;
- training: train, trainer-worker, runs;
- saes: analyze, publish, publish-set, import, add, export;
- evaluate: evaluate (an SAE's report card);
- graphs: graph, graph-worker, graph-cancel (attribution graphs);
- service: serve, inference, worker, explain, jobs, keys, demo;
- interpret: embed-explanations;
- admin: db, settings, models, sites;
- lineage: relate;
- structure: map.

Every user mistake ends in one line on stderr (`error: what is wrong (what to do)`) and a non-zero
exit status, never a traceback; set SAE_ATLAS_DEBUG=1 to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from app.cli import admin, evaluate, graphs, interpret, lineage, saes, service, structure, training
from app.cli.flags import add_dataclass_flags, build_config
from app.cli.training import SUBMIT_FIELDS
from store.errors import AtlasError

__all__ = ["SUBMIT_FIELDS", "build_config", "build_parser", "main"]

HANDLERS = {name[4:].replace("_", "-"): getattr(m, name) for m in (admin, evaluate, graphs, interpret, lineage, saes, service, structure, training)
            for name in dir(m) if name.startswith("cmd_")}


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
                       help="queue the run for a trainer worker instead of training here (it is analysed and published too; "
                            "transcoder sites (mlp.*) must cover every block: the set is published and registered for graphs)")
    train.add_argument("--name", help="with --submit: name of the published SAE (a sweep's prefix)")
    train.add_argument("--analyze-tokens", dest="analyze_tokens", type=int, help="with --submit: tokens for the dashboards")
    train.add_argument("--gpus", type=int, help="with --submit: devices for the run (torchrun when more than one)")
    train.add_argument("--priority", type=int, help="with --submit: higher runs first")
    train.add_argument("--description", help="with --submit: shown on the SAE page")
    train.add_argument("--set-publish", dest="set_publish", choices=["light", "full"],
                       help="with --submit, transcoder sets: light (the default) samples the embedding score, full scores every latent")
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

    ps = sub.add_parser("publish-set", help="analyse and publish every block of a transcoder set and register the set "
                                            "for attribution graphs")
    ps.add_argument("set_path", metavar="SET", help="a run folder holding one transcoder_set*.json, or the manifest")
    ps.add_argument("--prefix", required=True, help="block L is published as PREFIX-LL (e.g. --prefix tc -> tc-L0, tc-L1, ...)")
    ps.add_argument("--name", help="the set's name for graphs (DATA_DIR/transcoder_sets/NAME; default: the prefix)")
    ps.add_argument("--tokens", type=int, default=None,
                    help="tokens each block's analysis reads, all blocks from one LM pass (default 100000)")
    ps.add_argument("--light", action="store_true",
                    help="compute the embedding score of a sample of 64 latents per block (the rest: not computed) "
                         "and relate no blocks: fast enough for a 30-block set")
    ps.add_argument("--corpus", help="corpus of the dashboards (default: the set's training corpus)")
    ps.add_argument("--device", default="auto")
    ps.add_argument("--replace", action="store_true", help="publish again blocks already published, re-register the set")

    imp = sub.add_parser("import", help="bring an SAELens, Gemma Scope or sparsify SAE into DATA_DIR/saes")
    imp.add_argument("source")
    imp.add_argument("--model", required=True)
    imp.add_argument("--site", help="default: from the SAE's cfg.json")
    imp.add_argument("--output-site", dest="output_site", help="transcoders: the site they predict (default: from the SAE's files)")
    imp.add_argument("--name", required=True)
    imp.add_argument("--overwrite", action="store_true")

    exp = sub.add_parser("export", help="write an SAE folder in SAELens or sparsify layout, for those libraries to load")
    exp.add_argument("sae_dir", help="SAE folder (ours, SAELens, sparsify or Gemma Scope)")
    exp.add_argument("--format", required=True, choices=["saelens", "sparsify"], help="sparsify: TopK SAEs and transcoders only")
    exp.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    exp.add_argument("--model", help="model name to record (default: the SAE's own)")

    add = sub.add_parser("add", help="import + analyze + publish in one command")
    add.add_argument("source")
    add.add_argument("--model", required=True)
    add.add_argument("--site")
    add.add_argument("--output-site", dest="output_site")
    add.add_argument("--name", required=True)
    add.add_argument("--tokens", type=int, default=1_000_000)
    add.add_argument("--corpus", default="pydoc")
    add.add_argument("--replace", action="store_true")
    add.add_argument("--description")

    serve = sub.add_parser("serve", help="run the web explorer and REST API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=None,
                       help="server processes (default: the web_workers setting, one per CPU core up to 4)")
    serve.add_argument("--no-inference", action="store_true",
                       help="do not start the inference service beside the web server (see SAE_ATLAS_INFERENCE_SPAWN)")

    inf = sub.add_parser("inference", help="run the inference service (live model: try text, search, steer, contrast)")
    inf.add_argument("--listen", help="http://HOST:PORT or unix:/path.sock (default: SAE_ATLAS_INFERENCE_URL)")

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

    emb = sub.add_parser("embed-explanations",
                         help="embed explanations that have no search vector (stored before the embedding model was there)")
    emb.add_argument("--sae", help="only this SAE's explanations (default: all)")
    emb.add_argument("--chunk", type=int, default=256, help="explanations embedded and committed at a time")
    emb.add_argument("--replace", action="store_true",
                     help="also re-embed explanations whose vector comes from another embedding model")

    jobs = sub.add_parser("jobs", help="list or cancel auto-interp jobs")
    jobs.add_argument("jobs_command", choices=["list", "cancel"], nargs="?", default="list")
    jobs.add_argument("id", nargs="?", type=int)
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)

    keys = sub.add_parser("keys", help="API keys: create NAME, list, revoke NAME")
    keys.add_argument("keys_command", choices=["create", "list", "revoke"])
    keys.add_argument("name", nargs="?")
    keys.add_argument("--scope", choices=["read", "write"], default="write",
                      help="read: reads of a private atlas (public_reads=false); write: also jobs, runs, cancels "
                           "(default write)")

    evaluate.add_parsers(sub)
    graphs.add_parsers(sub)
    lineage.add_parsers(sub)
    structure.add_parsers(sub)

    demo = sub.add_parser("demo", help="build the demo atlas on the bundled model (first run) and serve it")
    demo.add_argument("--rebuild", action="store_true")
    demo.add_argument("--no-serve", action="store_true")
    demo.add_argument("--workers", type=int, default=None, help="server processes (default: the web_workers setting)")
    demo.add_argument("--tokens", type=int, default=None, help="training tokens (default from app/demo.py)")
    demo.add_argument("--circuits", action="store_true",
                      help="also train the 30-block transcoder set and store three example attribution graphs (long: see README)")
    return p


def main(argv: list[str] | None = None) -> int:
    from store.settings import get_settings

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
            return HANDLERS[args.command](args, extra)
        handler = HANDLERS[args.command]
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

