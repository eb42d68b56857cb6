"""Stored contrastive queries: the texts and the answer behind a /contrast/{id} permalink,
and the parsing of sets of texts (pasted, or a .txt / .jsonl upload)."""

from __future__ import annotations

import json
import secrets
import zlib

from sqlalchemy.orm import Session

from store.errors import NotFound
from app.inference.schemas import MAX_TEXT_CHARS, ServiceError
from store.models import ContrastQuery


def save_query(session: Session, body, answer: dict, requested_by: str | None) -> ContrastQuery:
    texts = zlib.compress(json.dumps({"a": body.set_a, "b": body.set_b}, ensure_ascii=False).encode(), 6)
    params = {"direction": body.direction, "density_min": body.density_min, "density_max": body.density_max,
              "limit": body.limit, "saes": body.saes, "model": body.model}
    row = ContrastQuery(id=secrets.token_hex(10), lm_name=answer["model"], label_a=body.label_a, label_b=body.label_b,
                        n_a=answer["n_a"], n_b=answer["n_b"], params=params, texts=texts, result=answer,
                        requested_by=requested_by)
    session.add(row)
    session.commit()
    return row


def load_query(session: Session, query_id: str) -> ContrastQuery:
    row = session.get(ContrastQuery, query_id) if len(query_id) <= 32 and query_id.isalnum() else None
    if row is None:
        raise NotFound(f"no contrastive query {query_id[:40]!r}")
    return row


def query_texts(row: ContrastQuery) -> tuple[list[str], list[str]]:
    data = json.loads(zlib.decompress(row.texts))
    return data["a"], data["b"]


def split_texts(raw: str, split: str) -> list[str]:
    """Pasted text or a .txt file: one text per line, or texts separated by blank lines."""
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    if split == "line":
        parts = raw.split("\n")
    else:
        parts, current = [], []
        for line in raw.split("\n"):
            if line.strip():
                current.append(line)
            elif current:
                parts.append("\n".join(current))
                current = []
        if current:
            parts.append("\n".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_upload(name: str, data: bytes, split: str, max_bytes: int, label: str) -> list[str]:
    """A .txt (split like pasted text) or .jsonl (one JSON string, or object with "text", per line) upload."""
    if len(data) > max_bytes:
        raise ServiceError(413, "too_large", f"{label}: the file has {len(data):,} bytes; the limit is {max_bytes:,} "
                                             "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_BYTES)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError(422, "invalid_parameters", f"{label}: the file is not UTF-8 text") from None
    lower = (name or "").lower()
    if lower.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ServiceError(422, "invalid_parameters", f"{label}: line {n} of {name} is not JSON ({exc.msg})") from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise ServiceError(422, "invalid_parameters",
                                   f'{label}: line {n} of {name} must be a JSON string or an object with a "text" string')
            if item.strip():
                out.append(item)
    elif lower.endswith(".txt") or not lower:
        out = split_texts(text, split)
    else:
        raise ServiceError(422, "invalid_parameters", f"{label}: upload a .txt or .jsonl file, not {name!r}")
    too_long = next((i for i, t in enumerate(out) if len(t) > MAX_TEXT_CHARS), None)
    if too_long is not None:
        raise ServiceError(422, "invalid_parameters",
                           f"{label}: text {too_long + 1} has more than {MAX_TEXT_CHARS:,} characters")
    return out
