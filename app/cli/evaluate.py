"""`evaluate NAME|FOLDER`: the report card of an SAE (trainer/report_card.py), printed, and stored
with the SAE when it is published (by name, or a folder some published SAE was published from)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from store.errors import AtlasError

# Settings a published SAE's analysis recorded, used as defaults when it is evaluated by name: the
# report card then reads the held-out text its dashboards were computed on.
FROM_ANALYSIS = ("corpus", "text_field", "eval_fraction", "ctx_len", "seed", "exclude_bos", "sink_norm_ratio")


def add_parsers(sub) -> None:
    from app.cli.flags import add_dataclass_flags
    from trainer.report_card import EvaluateConfig

    ev = sub.add_parser("evaluate", help="report card of an SAE: FVU, L0, dead, cosine, CE recovered and delta loss "
                                         "with 95%% intervals, and with --probing / --absorption SAEBench's sparse "
                                         "probing and feature absorption (stored when the SAE is published)")
    ev.add_argument("target", metavar="NAME|FOLDER", help="a published SAE's name, or an SAE folder (ours, SAELens, "
                                                          "sparsify, Gemma Scope)")
    ev.add_argument("--json", action="store_true", help="print the report card as JSON")
    ev.add_argument("--no-store", dest="no_store", action="store_true", help="do not store the result, even when published")
    add_dataclass_flags(ev, EvaluateConfig, skip=("sae_dir",))


def _engine_if_ready():
    """The store's engine when its schema is current, else None and why (a folder needs no store)."""
    from store.db import check_schema, get_engine

    engine = get_engine()
    try:
        check_schema(engine)
    except AtlasError as exc:
        return None, f"no store to keep it in: {exc.one_line()}"
    return engine, ""


def resolve_target(target: str) -> tuple[Path, dict | None, str]:
    """(SAE folder, the published SAE it is or None, why it cannot be stored) for NAME|FOLDER."""
    from sqlalchemy.orm import Session

    from store import evaluations
    from store.models import SAE, SAEStatus

    path = Path(target).expanduser()
    if path.exists():
        engine, why = _engine_if_ready()
        if engine is None:
            return path, None, why
        with Session(engine) as session:
            sae = evaluations.published_at_folder(session, path)
            if sae is None:
                return path, None, "the folder is not published (publish it, then evaluate it again to keep the report card)"
            return path, _published(sae), ""
    if "/" in target or target.startswith("."):
        raise AtlasError(f"SAE folder {path} does not exist", "check the path, or pass a published SAE's name")
    from sqlalchemy import select

    from store.db import check_schema, get_engine
    from store.errors import SchemaOutOfDate

    engine = get_engine()
    try:
        check_schema(engine)
    except SchemaOutOfDate as exc:
        raise AtlasError(f"there is no folder {target}, and the store cannot be searched for an SAE of that name: "
                         f"{exc.message}", exc.hint) from None
    with Session(engine) as session:
        sae = session.scalar(select(SAE).where(SAE.name == target, SAE.status == SAEStatus.ready.value))
        if sae is None:
            raise AtlasError(f"no published SAE named {target!r} and no folder {target}",
                             "pass a published SAE's name (GET /api/v1/saes lists them) or an SAE folder")
        return evaluations.weights_folder(sae), _published(sae), ""


def _published(sae) -> dict:
    return {"id": sae.id, "name": sae.name, "model": sae.lm.name, "site": sae.site,
            "analysis": ((sae.config or {}).get("analysis") or {})}


def cmd_evaluate(args) -> int:
    from app.cli.flags import build_config
    from trainer.report_card import EvaluateConfig, evaluate_folder

    names = {f.name for f in dataclasses.fields(EvaluateConfig)} - {"sae_dir"}
    given = {k: v for k, v in vars(args).items() if k in names}
    folder, published, why = resolve_target(args.target)
    values = dict(given)
    if published is not None:
        analysis = published["analysis"]
        values.setdefault("model", published["model"])
        for key in FROM_ANALYSIS:
            if key not in values and key in analysis:
                values[key] = analysis[key]
    cfg = build_config(EvaluateConfig, values, {"sae_dir": folder})
    card = evaluate_folder(cfg, progress=sys.stderr.isatty())
    stored = None
    if published is not None and (card.settings["model"], card.settings["site"]) != (published["model"], published["site"]):
        # Measured on another model or site than the published SAE's: not its report card.
        why = (f"evaluated on {card.settings['model']} {card.settings['site']}, not on the published SAE's "
               f"{published['model']} {published['site']} (a published SAE keeps the report card of its own)")
        published = None
    if published is not None and not args.no_store:
        stored = _store(published["id"], card)
    if args.json:
        print(json.dumps({**card.to_json(), "sae": published["name"] if published else None, "evaluation_id": stored},
                         indent=1))
    else:
        print(format_card(card))
        if stored is not None:
            print(f"stored as evaluation {stored} of {published['name']} (shown on /saes/{published['name']})")
        elif published is not None:
            print("not stored (--no-store)")
        else:
            print(f"not stored: {why}")
    return 0


def _store(sae_id: int, card) -> int:
    from sqlalchemy.orm import Session

    from store import evaluations
    from store.db import get_engine

    with Session(get_engine()) as session, session.begin():
        return evaluations.write_evaluation(session, sae_id, card.settings, card.metrics, card.n_tokens)


def _pct(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _num(x, digits=4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def format_card(card) -> str:
    """The report card as a few aligned lines of text."""
    m, s = card.metrics, card.settings
    head = (f"{card.sae_dir}: {s.get('kind')} on {s.get('site')} of {s.get('model')}; "
            f"{m.get('eval_tokens', 0):,} held-out tokens of {s.get('corpus')}, {m.get('ce_contexts', 0)} contexts "
            f"of {s.get('ctx_len')} for the loss; {card.elapsed_s:.1f} s")
    lines = [head]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<18}{value}")

    row("FVU", f"{_num(m.get('fvu'))}  (explained variance {_pct(m.get('explained_variance'))})")
    row("L0", _num(m.get("l0")))
    row("dead / dense", f"{_pct(m.get('dead_frac_eval'))} / {_pct(m.get('dense_frac'))}  "
                        "(never fired / fired on > 10% of the tokens)")
    row("cosine", _num(m.get("cos_sim")))
    row("CE clean", _num(m.get("ce_clean")))
    row("CE spliced", _num(m.get("ce_sae")))
    row("CE zero-ablated", _num(m.get("ce_zero_ablation")))
    for key, label, fmt in (("ce_recovered", "CE recovered", _pct), ("delta_lm_loss", "Δ LM loss", _num)):
        v, hw, iv = m.get(key), m.get(f"{key}_ci95"), m.get(f"{key}_interval")
        text = fmt(v)
        if hw is not None and iv:
            text += f" ± {fmt(hw, 2) if fmt is _pct else _num(hw, 2)}  [{fmt(iv[0])}, {fmt(iv[1])}], 95%"
        row(label, text)
    sp = m.get("sparse_probing")
    if sp:
        ks = sp.get("k_values", [])
        tops = ", ".join(f"top-{k} {_pct(sp.get(f'sae_top_{k}_test_accuracy'))}" for k in ks)
        row("sparse probing", f"SAE {tops}; all latents {_pct(sp.get('sae_test_accuracy'))}; "
                              f"LM {_pct(sp.get('llm_test_accuracy'))} (test accuracy, mean of {len(sp.get('tasks', {}))} tasks)")
    ab = m.get("absorption")
    if ab:
        probe = f"probe accuracy {_pct(ab.get('probe_accuracy'))}, {len(ab.get('letters_counted', []))} letters at F1 > 0.6"
        if ab.get("evaluated"):
            row("absorption", f"{_num(ab.get('mean_absorption_fraction'), 3)} (full {_num(ab.get('mean_full_absorption_rate'), 3)}; "
                              f"{probe})")
        else:
            row("absorption", f"not measured: {ab.get('reason')} ({probe})")
    return "\n".join(lines)
