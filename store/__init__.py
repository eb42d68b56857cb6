"""The store: the ground floor that the offline pipeline (trainer/) and the service (app/) both stand on.

It holds the ORM models (models), the engine and sessions (db), the shared settings and errors
(settings, errors), the retry rules for OpenAI-compatible servers (retry), where the packaged
resources are (paths), the writes of explanation vectors (vectors), and the read-side queries that
the JSON API and the HTML pages share, one module per concept:

- vocab: token display and vocabularies (decoded once per process);
- saes: published SAEs and LMs;
- feature: one feature's dashboard, the hot path (a fixed number of indexed queries);
- table: the feature table of an SAE;
- search: explanations by text, latents by token;
- cache: the bounded cache of rendered feature responses;
- jobs: auto-interp jobs as pages list them.

Every function reads only published (status = ready) SAEs, so a half-written SAE is never visible.
Callers use `import store` and `store.name`; the names below are the public surface of the reads.
Nothing here imports app/ or trainer/.
"""

from __future__ import annotations

from store import saes as _saes
from store import search as _search
from store import vocab as _vocab
from store.cache import RENDERED, RenderCache
from store.feature import (
    EXAMPLES_QUERY,
    FEATURE_QUERY,
    FEATURE_QUERY_WITH_JOB,
    MAX_LATENT_INDEX,
    ExampleRow,
    FeatureRow,
    example_dict,
    example_dicts,
    examples_for,
    explanation_dict,
    feature_payload,
    hist_edges,
    load_feature,
    neighbor_explanations,
    shown_neighbor_explanations,
)
from store.jobs import count_jobs, job_counts, live_job_for, recent_jobs
from store.saes import (
    SAEInfo,
    feature_by_index,
    feature_etag,
    list_lms,
    list_saes,
    sae_by_name,
    sae_info,
)
from store.search import search_by_token, search_by_token_page, search_explanations
from store.table import MAX_PAGE_SIZE, SORTS, TableQuery, feature_summary, feature_table
from store.vocab import Vocab, chip, make_vocab, token_html, visible, vocab_for


def forget_caches() -> None:
    """Drop every per-process cache (tests, and after a database is swapped)."""
    _vocab._vocab_by_lm.clear()
    _vocab._decode_vocab.cache_clear()
    _saes._sae_info.clear()
    RENDERED.clear()
    _search.forget_matrices()


__all__ = [
    "EXAMPLES_QUERY", "FEATURE_QUERY", "FEATURE_QUERY_WITH_JOB", "MAX_LATENT_INDEX", "MAX_PAGE_SIZE", "RENDERED",
    "SORTS", "ExampleRow", "FeatureRow", "RenderCache", "SAEInfo", "TableQuery", "Vocab", "chip", "example_dict",
    "example_dicts", "examples_for", "explanation_dict", "feature_by_index", "feature_etag",
    "feature_payload", "feature_summary", "feature_table", "forget_caches", "hist_edges", "count_jobs", "job_counts",
    "list_lms", "list_saes", "live_job_for", "load_feature", "make_vocab", "neighbor_explanations", "recent_jobs",
    "sae_by_name", "sae_info", "search_by_token", "search_by_token_page", "search_explanations", "shown_neighbor_explanations", "token_html", "visible", "vocab_for",
]
