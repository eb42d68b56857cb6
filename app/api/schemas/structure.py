"""The structure of an SAE: co-firing partners, the map and feature groups."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.api.schemas.features import NeighborLinks


class CofiringItem(BaseModel):
    index: int = Field(description="the partner latent j")
    n_together: int = Field(description="analysed tokens on which both fire (N_ij)")
    p_partner_given_this: float = Field(description="P(j | i) = N_ij / N_i")
    p_this_given_partner: float = Field(description="P(i | j) = N_ij / N_j")
    lift: float = Field(description="P(i, j) / (P(i) P(j)): how many times more often than independent latents")
    explanation: str | None
    links: NeighborLinks


class CofiringOut(BaseModel):
    sae: str
    index: int
    k: int
    items: list[CofiringItem] = Field(description="partners by decreasing lift")
    available: int
    computed: bool = Field(description="false when the SAE was published from an analysis without co-firing counts")


class MapCluster(BaseModel):
    id: int
    size: int
    label: str
    words: list[str]
    x: float
    y: float


class MapPoints(BaseModel):
    index: list[int]
    x: list[float]
    y: list[float]
    cluster: list[int | None] = Field(description="-1: in no cluster")
    density: list[float]
    explanation: list[str | None]


class MapOut(BaseModel):
    sae: str
    config: dict[str, Any] = Field(description="UMAP and Leiden settings the map was made with")
    clusters: list[MapCluster]
    points: MapPoints = Field(description="one entry per latent, as columns")


class GroupSummary(BaseModel):
    rank: int = Field(description="0 is the most irreducible group of the SAE")
    latents: list[int]
    n_tokens: int = Field(description="sampled tokens the projection and indices use")
    separability: float = Field(description="separability index S (bits): min over rotations of I(a; b); high = not separable")
    mixture: float = Field(description="epsilon-mixture index M: largest share of points near one line; low = not a mixture")
    circle_residual: float = Field(description="RMS distance of the 2-D scatter to its fitted circle / radius")
    variance_share: list[float] = Field(description="variance share of the top two principal components")


class GroupScatter(BaseModel):
    x: list[float]
    y: list[float]
    token: list[int]
    token_text: list[str]
    latent: list[int] = Field(description="the group latent that fires most on each point's token")


class GroupOut(GroupSummary):
    sae: str
    scatter: GroupScatter
