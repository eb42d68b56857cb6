"""`db`, `settings`, `models` and `sites`: the store's schema and what is available."""

from __future__ import annotations


def cmd_db(args) -> int:
    from store.db import check_schema, current_revision, describe, get_engine, head_revision, upgrade

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
    from store.settings import Settings, get_settings

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
    print(f"{lm.name}: {lm.n_layers} blocks, d_model {lm.d_model}; sites: resid_post.L, mlp_out.L, attn_out.L, mlp_in.L for L in 0..{lm.n_layers - 1}")
    return 0
