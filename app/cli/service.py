"""`serve`, `inference`, `worker`, `explain`, `jobs`, `keys` and `demo`: the running service and its queue."""

from __future__ import annotations

import sys

from store.errors import AtlasError


def cmd_serve(args) -> int:
    import uvicorn

    from store.db import check_schema
    from store.settings import get_settings

    check_schema()
    s = get_settings()
    host, port = args.host or s.host, args.port or s.port
    workers = args.workers or s.server_processes
    if workers < 1:
        raise AtlasError("--workers must be at least 1")
    inference = start_inference_beside(s, getattr(args, "no_inference", False))
    print(f"SAE Atlas is serving at http://{host}:{port} ({workers} server process{'es' if workers > 1 else ''})",
          flush=True)
    try:
        # proxy_headers off: X-Forwarded-* are believed only from SAE_ATLAS_TRUSTED_PROXIES (app.security).
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=s.log_level.lower(), access_log=False, proxy_headers=False)
    finally:
        stop_child(inference)
    return 0


def start_inference_beside(settings, disabled: bool = False):
    """`serve` starts the inference service as its own process, unless inference is off, the
    service runs elsewhere (SAE_ATLAS_INFERENCE_SPAWN=false, --no-inference), or one already
    answers at SAE_ATLAS_INFERENCE_URL. Returns the child process, or None."""
    import subprocess

    from app.inference.client import InferenceClient

    if settings.inference != "on" or not settings.inference_spawn or disabled:
        return None
    from app.api_error import ApiError

    probe = InferenceClient(settings.inference_url, 5)
    try:
        probe.status()
        print(f"Using the inference service already running at {settings.inference_url}", flush=True)
        return None
    except ApiError:  # nothing answers there: start our own
        pass
    finally:
        probe.close()
    print(f"Starting the inference service at {settings.inference_url} (models load on first use)", flush=True)
    return subprocess.Popen([sys.executable, "-m", "app.cli", "inference"], stdin=subprocess.DEVNULL)


def stop_child(proc, grace: float = 15) -> None:
    import subprocess

    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cmd_inference(args) -> int:
    from store.db import check_schema
    from app.inference.client import parse_url
    from app.inference.service import serve_inference
    from store.settings import get_settings

    s = get_settings()
    if s.inference != "on":
        raise AtlasError("live inference is turned off (SAE_ATLAS_INFERENCE=off)", "set SAE_ATLAS_INFERENCE=on to run the service")
    target = args.listen or s.inference_url
    kind, where = parse_url(target)
    check_schema()
    if kind == "unix":
        _clear_stale_socket(where)
    print(f"SAE Atlas inference service listening at {target} (device {s.device})", flush=True)
    serve_inference(target)
    return 0


def _clear_stale_socket(path: str) -> None:
    """A socket file left by a service that died would make the bind fail; one that answers is live."""
    import os
    import socket
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AtlasError(f"an inference service is already listening on {path}", "stop it first, or use another SAE_ATLAS_INFERENCE_URL")


def cmd_worker(args) -> int:
    from app.autointerp.worker import run_worker
    from store.db import check_schema

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
    from store.db import check_schema, session_scope

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
    from store.db import check_schema, session_scope
    from store.models import Job

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
    from store.db import check_schema, session_scope
    from app.security import create_key, list_keys, revoke_key

    check_schema()
    with session_scope() as session:
        if args.keys_command == "create":
            key = create_key(session, args.name, scope=getattr(args, "scope", "write"))
            print(key)
            print(f"# API key {args.name!r} ({getattr(args, 'scope', 'write')}) created; it is shown once. "
                  "Send it as 'Authorization: Bearer <key>'.", file=sys.stderr)
        elif args.keys_command == "revoke":
            revoke_key(session, args.name)
            print(f"revoked {args.name}")
        else:
            for k in list_keys(session):
                print(f"{k.name:24} {k.prefix}…  {k.scope:5}  created {k.created_at:%Y-%m-%d}  "
                      f"{'revoked' if k.revoked_at else 'active'}")
    return 0


def cmd_demo(args) -> int:
    """Build the demo atlas here, then serve it from fresh processes: `sae-atlas serve` (with the
    configured number of server processes) and an auto-interp worker. The building process has
    torch, the LM and a heap full of training and analysis objects; a server forked from it (or
    run in it) pays for that on every request and every garbage collection."""
    import signal
    import subprocess

    from app.demo import build_demo
    from store.settings import get_settings

    build_demo(rebuild=args.rebuild, tokens=args.tokens, circuits=args.circuits)
    if args.no_serve:
        return 0
    workers = args.workers or get_settings().server_processes
    # An auto-interp worker beside the server, so that "Request an explanation" does something.
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], stdin=subprocess.DEVNULL)
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", str(workers)],
                              stdin=subprocess.DEVNULL)
    forward = lambda signum, frame: server.send_signal(signum)  # noqa: E731  (the server shuts down cleanly)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group; let the server finish
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in (server, worker):
            if proc.poll() is None:
                proc.terminate()
        for proc in (server, worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
