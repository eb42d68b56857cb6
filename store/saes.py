"""Published SAEs and LMs: listing, lookup by name, and the per-version description pages use."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.errors import NotFound
from store.models import LM, SAE, Explanation, Feature, SAEStatus


def list_lms(session: Session) -> list[LM]:
    return list(session.scalars(select(LM).order_by(LM.name)))


def list_saes(session: Session) -> list[SAE]:
    return list(session.scalars(select(SAE).where(SAE.status == SAEStatus.ready.value).order_by(SAE.name)))


def sae_by_name(session: Session, name: str) -> SAE:
    if "\x00" in name or len(name) > 200:  # PostgreSQL rejects NUL in text; no SAE can have such a name
        raise NotFound(f"no SAE named {name[:200]!r}")
    sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise NotFound(f"no SAE named {name!r}")
    return sae


@dataclass(frozen=True)
class SAEInfo:
    """What a feature page needs to know about its SAE: immutable for one published version."""

    id: int
    name: str
    version: str
    d_sae: int
    lm_id: int
    lm_name: str
    site: str
    architecture: str
    k: int | None
    d_in: int
    n_tokens_analyzed: int

    @classmethod
    def of(cls, sae: SAE) -> SAEInfo:
        return cls(sae.id, sae.name, sae.version, sae.d_sae, sae.lm_id, sae.lm.name, sae.site, sae.architecture,
                   sae.k, sae.d_in, sae.n_tokens_analyzed)


_sae_info: dict[tuple[int, str], SAEInfo] = {}


def sae_info(session: Session, sae_id: int, version: str) -> SAEInfo:
    """The SAE's description, cached per (id, version): a republished SAE gets a new version."""
    info = _sae_info.get((sae_id, version))
    if info is None:
        sae = session.get(SAE, sae_id)
        if sae is None:
            raise NotFound(f"SAE {sae_id} has gone")
        info = SAEInfo.of(sae)
        if len(_sae_info) > 256:
            _sae_info.clear()
        _sae_info[(sae_id, version)] = info
    return info


def feature_by_index(session: Session, sae: SAE, index: int) -> Feature:
    if not 0 <= index < sae.d_sae:
        raise NotFound(f"SAE {sae.name!r} has latents 0..{sae.d_sae - 1}; {index} is out of range")
    f = session.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.index == index))
    if f is None:
        raise NotFound(f"latent {index} of {sae.name!r} not found")
    return f


def feature_etag(session: Session, sae: SAE, feature: Feature) -> str:
    """Changes when the SAE is republished or the feature gains an explanation."""
    n, last = session.execute(
        select(func.count(Explanation.id), func.max(Explanation.id)).where(Explanation.feature_id == feature.id)).one()
    return f'W/"{sae.version[:16]}-{feature.index}-{n}-{last or 0}"'
