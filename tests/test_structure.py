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


# --- a planted circle (Engels et al.'s weekdays, in miniature) ---------------------------------------

D_PLANT, N_IND, WIDTH_PLANT = 64, 40, 48


def _planted(n, seed):
    """Activations: with probability 0.3 a point on a circle of radius 3 in the plane (u, w), plus 40
    independent 1-D features (unit directions orthogonal to the plane, each firing on 4% of rows with
    log-normal magnitudes). The geometry is fixed; `seed` draws the rows."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((D_PLANT, D_PLANT)))
    u, w = q[:, 0], q[:, 1]
    ind = rng.standard_normal((N_IND, D_PLANT))
    ind -= np.outer(ind @ u, u) + np.outer(ind @ w, w)
    ind /= np.linalg.norm(ind, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 100)
    on_circle = rng.random(n) < 0.3
    phi = rng.uniform(0, 2 * np.pi, n)
    x = (on_circle * 3.0)[:, None] * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * w)
    x += ((rng.random((n, N_IND)) < 0.04) * rng.lognormal(0, 0.3, (n, N_IND))) @ ind
    return x.astype(np.float32), u, w, ind


def _paper_mixture_index(p, eps=0.1):
    """M_eps = max over unit v and offset c of P(|v.f + c| < eps sqrt(E[(v.f + c)^2])), by brute force on a
    fine grid of angles and offsets."""
    best = 0.0
    for th in np.linspace(0, np.pi, 360, endpoint=False):
        proj = p @ np.array([np.cos(th), np.sin(th)])
        for c in -np.linspace(proj.min(), proj.max(), 400):
            best = max(best, np.mean(np.abs(proj + c) < eps * np.sqrt(np.mean((proj + c) ** 2))))
    return best


def _paper_separability_index(p, bins=12):
    """S = min over rotations of I(a; b) in bits, of the standardised 2-D feature: histogram plug-in."""
    p = (p - p.mean(0)) / p.std(0)
    best = np.inf
    for th in np.linspace(0, np.pi / 2, 180, endpoint=False):
        a = np.cos(th) * p[:, 0] - np.sin(th) * p[:, 1]
        b = np.sin(th) * p[:, 0] + np.cos(th) * p[:, 1]
        h, _, _ = np.histogram2d(a, b, bins=bins)
        pab = h / h.sum()
        pa, pb = pab.sum(1), pab.sum(0)
        mi = sum(pab[i, j] * np.log2(pab[i, j] / (pa[i] * pb[j])) for i in range(bins) for j in range(bins) if pab[i, j] > 0)
        best = min(best, mi)
    return best


def _circle_residual(p):
    """RMS distance to the least-squares circle (centre and radius by scipy's optimiser) / radius."""
    from scipy.optimize import least_squares

    def resid(c):
        return np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]) - c[2]

    c = least_squares(resid, [p[:, 0].mean(), p[:, 1].mean(), np.hypot(*(p - p.mean(0)).T).mean()]).x
    return np.sqrt(np.mean(resid(c) ** 2)) / abs(c[2])


def test_planted_circle_is_found_as_one_irreducible_group(tmp_path):
    from trainer.analyze import decoder_neighbors
    from trainer.formats import load_sae
    from trainer.structure.groups import (GroupConfig, collect_group_codes, find_groups, measure_groups,
                                          mixture_index, project, separability_index)
    from trainer.train import TrainConfig, train

    x, u, w, ind = _planted(200_000, seed=0)
    np.save(tmp_path / "acts.npy", x)
    cfg = TrainConfig(out=tmp_path / "run", activations=tmp_path / "acts.npy", site=["resid_post.0"], arch=["topk"],
                      width=[WIDTH_PLANT], k=[4], tokens=200_000, batch_size=512, seed=0, device="cpu", ce_contexts=0,
                      checkpoint_every=0, log_every=1000, eval_tokens=4096, lr=3e-3, dead_after_tokens=10_000, aux_k=4,
                      aux_coefficient=1 / 8)
    (folder,) = train(cfg)
    sae = load_sae(folder).sae.eval()
    xt, *_ = _planted(20_000, seed=1)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(xt))
    vals = (codes.values * sae.W_dec.norm(dim=1)[codes.indices]).numpy()
    on = vals > 0
    tok, lat, act = np.nonzero(on)[0], codes.indices.numpy()[on], vals[on]
    directions = sae.W_dec.detach().numpy()
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    counts = np.bincount(lat, minlength=WIDTH_PLANT)
    circle = set(np.nonzero((np.hypot(unit @ u, unit @ w) > 0.9) & (counts > 0))[0].tolist())
    assert len(circle) >= 4  # the SAE tiled the circle

    gcfg = GroupConfig()
    partners = cofiring_partners(lambda: iter([(tok, lat)]), WIDTH_PLANT, len(xt))
    nb = decoder_neighbors(torch.from_numpy(directions), 16)
    groups = find_groups(directions, partners, gcfg, (nb["neighbor_ids"], nb["neighbor_cos"]))
    found = max(groups, key=lambda g: len(circle & set(g.tolist())))
    assert len(circle & set(found.tolist())) >= 0.8 * len(circle)  # the circle's latents, together
    assert len(circle & set(found.tolist())) >= 0.8 * len(found)  # and little else
    codes_of = lambda: iter([(tok, lat, act, tok)])  # noqa: E731 (the token's own index stands in for its id)
    measured = measure_groups(groups, directions, collect_group_codes(groups, WIDTH_PLANT, counts, codes_of, gcfg), gcfg)
    assert measured[0]["latents"] == found.tolist()  # the most irreducible group is the circle

    # its PCA scatter is a circle
    (coef, _), = collect_group_codes([found], WIDTH_PLANT, counts, codes_of, gcfg)
    pts, _ = project(directions[found], coef)
    assert _circle_residual(pts) < 0.3

    # a group of two independent 1-D features, for contrast
    pair = np.nonzero(np.abs(unit @ ind.T).max(1) > 0.95)[0][:2]
    (coef2, _), = collect_group_codes([pair], WIDTH_PLANT, counts, codes_of, gcfg)
    pts2, _ = project(directions[pair], coef2)
    m_circle, m_pair = _paper_mixture_index(pts), _paper_mixture_index(pts2)
    assert m_circle < 0.35 and m_pair > 0.5  # the pair is a mixture of two lines; the circle is not
    assert _paper_separability_index(pts) > 1.0  # a circle is far from two independent coordinates
    # our fast implementations agree with the definitions
    for p, m in ((pts, m_circle), (pts2, m_pair)):
        assert mixture_index(p, 0.1, 180) == pytest.approx(m, abs=0.03)
        assert separability_index(p, 12, 90) == pytest.approx(_paper_separability_index(p), abs=0.05)


def test_days_of_the_week_that_never_co_fire_are_one_group_by_their_directions():
    """Engels et al.'s weekdays: seven latents, one per day, whose decoder directions lie near one
    plane at the day's angle (plus a direction of their own), and that never fire on one token. The
    co-firing rule cannot link them; cos_alone links them by their directions alone, their group's
    scatter is seven spots on a circle (not a mixture, not separable), and latents that are similar
    to nothing stay out of it."""
    from trainer.analyze import decoder_neighbors
    from trainer.structure.groups import GroupConfig, collect_group_codes, find_groups, measure_groups

    rng = np.random.default_rng(0)
    D, F, N = 48, 40, 14_000
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    u, w = q[:, 0], q[:, 1]
    own = q[:, 2:2 + F]  # every latent's own direction, orthogonal to the plane and to each other
    days = np.arange(7)
    angle = 2 * np.pi * days / 7
    directions = own.T.copy()
    directions[days] = np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w + 0.35 * own.T[days]
    # tokens: a weekday on one in five (its latent alone), and two of the other 33 latents on every token
    tok, lat, act = [], [], []
    for t in range(N):
        fire = list(rng.choice(np.arange(7, F), 2, replace=False))
        if rng.random() < 0.2:
            fire.append(int(rng.integers(7)))
        tok += [t] * len(fire)
        lat += fire
        act += list(rng.lognormal(0, 0.1, len(fire)))
    tok, lat, act = np.array(tok), np.array(lat), np.array(act)
    partners = cofiring_partners(lambda: iter([(tok, lat)]), F, N)
    nb = decoder_neighbors(torch.from_numpy(directions.astype(np.float32)), 8)
    week = set(days.tolist())

    assert not any(week & set(g.tolist()) for g in find_groups(directions, partners, GroupConfig()))  # co-firing only
    # adjacent days: cos = cos(2 pi / 7) / (1 + 0.35^2) = 0.556; every other pair of latents: below 0.1
    cfg = GroupConfig(cos_alone=0.4)
    groups = find_groups(directions, partners, cfg, (nb["neighbor_ids"], nb["neighbor_cos"]))
    assert [g.tolist() for g in groups] == [days.tolist()]
    with pytest.raises(ValueError, match="neighbours"):
        find_groups(directions, partners, cfg)
    counts = np.bincount(lat, minlength=F)
    codes_of = lambda: iter([(tok, lat, act, tok)])  # noqa: E731
    (g,) = measure_groups(groups, directions, collect_group_codes(groups, F, counts, codes_of, cfg), cfg)
    pts = np.column_stack([g["scatter"]["x"], g["scatter"]["y"]])
    assert _paper_mixture_index(pts) < 0.35  # seven spots, at most two of them on one line
    assert _paper_separability_index(pts) > 1.0
    assert _circle_residual(pts) < 0.3


MAP_THREADS = """
import numba, numpy as np, torch
from trainer.structure.layout import MapConfig, build_map
want = 1 if numba.config.NUMBA_NUM_THREADS != 1 else 2  # a count numba's own would overwrite
torch.set_num_threads(want)
assert torch.get_num_threads() == want  # asked once (as publishing does): numba's start then overwrites it
d = np.random.default_rng(0).standard_normal((64, 8))
unit = d / np.linalg.norm(d, axis=1, keepdims=True)
cos = unit @ unit.T
np.fill_diagonal(cos, -np.inf)
ids = np.argsort(-cos, 1)[:, :8]
build_map(d, ids, np.take_along_axis(cos, ids, 1), None, [None] * 64, MapConfig(seed=0, n_epochs=10))
print(want, torch.get_num_threads())
"""


def test_the_map_leaves_torchs_thread_count_alone():
    """UMAP starts numba's threads, which with numba's OpenMP layer sets the OpenMP runtime torch
    shares to numba's count (every core). In a fresh process: that happens once, on first use."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MAP_THREADS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want, got = out.stdout.split()[-2:]
    assert got == want


def test_map_is_deterministic_for_a_seed():
    """Same seed, same layout and clusters; labels come from the members' explanations."""
    from trainer.structure.layout import MapConfig, build_map

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 24))
    d = np.repeat(centres, 50, 0) + 0.3 * rng.standard_normal((300, 24))  # six families of directions
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    ids = np.argsort(-cos, 1)[:, :16]  # exact neighbours, as the analysis gives them
    ncos = np.take_along_axis(cos, ids, 1)
    texts = [f"family{i // 50} words" for i in range(300)]
    a = build_map(d, ids, ncos, None, texts, MapConfig(seed=3, n_epochs=50))
    b = build_map(d, ids, ncos, None, texts, MapConfig(seed=3, n_epochs=50))
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["cluster"], b["cluster"])
    c = build_map(d, ids, ncos, None, texts, MapConfig(seed=4, n_epochs=50))
    assert not np.array_equal(a["x"], c["x"])
    # the six families come out as six clusters, each labelled by its own word
    assert len(a["clusters"]) == 6
    for cl in a["clusters"]:
        members = np.nonzero(a["cluster"] == cl["id"])[0]
        fam = members[0] // 50
        assert (members // 50 == fam).all() and cl["words"][0] == f"family{fam}"
