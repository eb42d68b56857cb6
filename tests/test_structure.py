"""The shape of an SAE: co-firing partners, multi-dimensional feature groups, the map.

Expected values come from brute force (a dense token x latent matrix for the counts) or from the
definitions of Engels et al. (2024) written out here, never from the code under test on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.relate.cofiring import cofiring_partners, cooccurrence_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_codes(n_tokens=3000, d_in=16, d_sae=40, k=4, seed=0):
    """Codes of a tiny random TopK SAE on random activations, as the analysis shards hold them:
    chunks of (token index, latent) for the active latents."""
    from trainer.sae import build_sae
    from trainer.sae.base import SAEConfig

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    x = torch.randn(n_tokens, d_in) + torch.randn(d_in)  # an offset makes some latents fire often
    with torch.no_grad():
        codes = sae.encode(x)
    active = codes.values > 0
    tok = torch.nonzero(active)[:, 0].numpy()
    lat = codes.indices[active].numpy()
    chunks = [(tok[(tok >= s) & (tok < s + 700)], lat[(tok >= s) & (tok < s + 700)]) for s in range(0, n_tokens, 700)]
    dense = np.zeros((n_tokens, d_sae), np.int64)
    dense[tok, lat] = 1
    return chunks, dense


@pytest.mark.parametrize("cells", [40 * 40, 7 * 40])  # one block, and blocks of 7 rows (the last one short)
def test_cooccurrence_counts_equal_brute_force(cells):
    chunks, dense = _random_codes()
    want = dense.T @ dense  # N_ij, with N_i on the diagonal
    got = np.zeros_like(want)
    for first, block in cooccurrence_blocks(lambda: iter(chunks), 40, cells=cells):
        got[first:first + len(block)] = block
    np.testing.assert_array_equal(got, want)


def test_partners_are_the_top_lift_pairs():
    chunks, dense = _random_codes()
    n, F = dense.shape
    m, min_count = 5, 3
    p = cofiring_partners(lambda: iter(chunks), F, n, m=m, min_count=min_count, cells=9 * F)
    nij = dense.T @ dense
    ni = dense.sum(0)
    np.testing.assert_array_equal(p.counts, ni)
    checked = 0
    for i in range(F):
        # brute force: every j != i with N_ij >= min_count and lift > 1, best lift first
        cand = sorted(((nij[i, j] * n / (ni[i] * ni[j]), nij[i, j], j) for j in range(F)
                       if j != i and nij[i, j] >= min_count and nij[i, j] * n > ni[i] * ni[j]), reverse=True)[:m]
        got = p.stats(i)
        assert len(got) == len(cand)
        for (j, n_ij, p_ji, p_ij, lift), (want_lift, want_n, _) in zip(got, cand):
            assert n_ij == nij[i, j] and lift == pytest.approx(want_lift) and n_ij == want_n
            assert p_ji == pytest.approx(nij[i, j] / ni[i]) and p_ij == pytest.approx(nij[i, j] / ni[j])
            checked += 1
    assert checked > F  # the random SAE does have partners to check


def test_analysis_and_publish_store_partners_groups_and_map(tiny_sae_dir, tmp_path):
    """The analysis writes partners from its own codes; publish stores them with the map."""
    from sqlalchemy.orm import Session

    from store import structure
    from store.db import make_engine, upgrade
    from store.models import SAE
    from trainer.publish import Analysis, publish

    a = Analysis.load(tiny_sae_dir)
    assert a.partners is not None and a.groups is not None
    F = len(a.features["count"])
    np.testing.assert_array_equal(a.partners.counts, a.features["count"])  # N_i is the latent's firing count
    engine = make_engine(f"sqlite:///{tmp_path / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False, make_map=True)
    with Session(engine) as s:
        sae = s.query(SAE).one()
        m = structure.sae_map(s, sae.id)
        assert m is not None and m.clusters and m.config["seed"] == 0
        pts = structure.map_points(s, sae.id)
        assert pts["index"] == list(range(F)) and all(np.isfinite(pts["x"]))
        sizes = {c["id"]: c["size"] for c in m.clusters}
        assert sum(sizes.values()) == sum(c >= 0 for c in pts["cluster"])
        with_partners = [i for i in range(F) if a.partners.stats(i)]
        assert with_partners
        place = structure.latent_place(s, sae.id, with_partners[0])
        assert [p[0] for p in place.partners] == [p[0] for p in a.partners.stats(with_partners[0])]
    engine.dispose()
