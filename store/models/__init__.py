"""The store's ORM: the one thing the trainer and the app share.

Sized for PostgreSQL with a million features and a hundred million example rows:
- per-feature arrays that are always read whole (histograms, logit tables, neighbours) live in
  JSON columns of the feature row, so a feature page is two indexed reads (feature + examples);
- examples keep their token ids and per-token activations packed (int32 / float16 bytes), about
  250 bytes a row for a 41-token window instead of 41 rows;
- every query the pages make has an index (see __table_args__), and big tables use BIGINT keys.
Constraint names follow one convention so that Alembic batch migrations work on SQLite too.

The tables live in one module per concept (atlas, interpretation, jobs, access, analysis) over
base (the declarative base, shared column types and enums); every name is imported from here.
"""

from __future__ import annotations

from store.models.access import APIKey, ContrastQuery, KeyScope, WebSession
from store.models.analysis import (
    FeatureGroup,
    FeatureLink,
    LatentStructure,
    SAEDarkMatter,
    SAEEvaluation,
    SAEMap,
    SAERelation,
)
from store.models.atlas import LM, SAE, Example, Feature
from store.models.base import (
    LIVE_JOB_STATUSES,
    NAMING_CONVENTION,
    Base,
    BigId,
    BigInt64,
    ExampleKind,
    JobStatus,
    SAEStatus,
    UTCDateTime,
    utcnow,
)
from store.models.interpretation import Explanation, ExplanationEmbedding, Judgement
from store.models.jobs import AttributionGraph, Job, RunMetric, TrainingRun

__all__ = [
    "Base",
    "NAMING_CONVENTION",
    "BigId",
    "BigInt64",
    "utcnow",
    "UTCDateTime",
    "SAEStatus",
    "ExampleKind",
    "JobStatus",
    "LIVE_JOB_STATUSES",
    "LM",
    "SAE",
    "Feature",
    "Example",
    "Explanation",
    "ExplanationEmbedding",
    "Judgement",
    "Job",
    "TrainingRun",
    "RunMetric",
    "AttributionGraph",
    "KeyScope",
    "APIKey",
    "ContrastQuery",
    "WebSession",
    "SAERelation",
    "FeatureLink",
    "SAEDarkMatter",
    "LatentStructure",
    "SAEMap",
    "FeatureGroup",
    "SAEEvaluation",
]
