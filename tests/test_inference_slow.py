"""Steering calibration on the bundled SmolLM2-135M: turning up a latent whose direct logit effect
(the logit table the analysis stores: W_U times the decoder direction, with the final norm's scale)
promotes token t raises t's probability, and turning it down lowers it; strength 0 changes nothing.
The SAE reads the last block's output, where the logit table is the whole effect (through the
final RMSNorm): at earlier sites the blocks in between may undo a direct effect, which is a
property of the model, not of the steering."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A small SAE at resid_post.29 (the last block) of the bundled model, analysed and published: its decoder rows
    are centred, normalised activations of corpus tokens (a realistic dictionary without training)."""
    import torch

    from store.db import make_engine, upgrade
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.corpus import Packer, open_corpus, split_documents
    from trainer.formats import save_sae
    from trainer.lm import load_lm
    from trainer.publish import publish
    from trainer.sae import SAEConfig, build_sae

    tmp = tmp_path_factory.mktemp("bundled-steer")
    lm = load_lm("smollm2-135m", "cpu", "float32")
    site = lm.site("resid_post.29")
    packer = Packer(lm.tokenizer, 64, lm.bos_token_id, lm.separator_token_id)
    (batch,) = list(packer.batches(split_documents(open_corpus("pydoc"), "train", 0.1, 3), 8, max_contexts=8))
    x = lm.read(batch.tokens, [site])[site.name][:, 1:].reshape(-1, lm.d_model).float()
    rows = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]] - x.mean(0)
    rows = rows / rows.norm(dim=1, keepdim=True)
    sae = build_sae(SAEConfig(d_in=lm.d_model, d_sae=256, architecture="topk", k=8))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows)  # f_i = the projection on d_i: activations in the units of the residual stream
        sae.b_dec.copy_(x.mean(0))
    folder = tmp / "sae"
    save_sae(folder, sae, 1.0, site.name, "smollm2-135m", training={"corpus": "pydoc", "ctx_len": 64})
    analyze(AnalyzeConfig(sae_dir=folder, tokens=2500, split="all", lm_dtype="float32", device="cpu",
                          lm_batch_size=16), lm=lm, progress=False)
    engine = make_engine(f"sqlite:///{tmp / 'atlas.db'}")
    upgrade(engine)
    publish(folder, "smol-l29", engine=engine, progress=False)
    yield engine
    engine.dispose()


def test_steering_a_latent_raises_the_probability_of_the_token_it_promotes(bundled):
    import torch
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.inference.registry import Registry, lookup_saes
    from app.inference.steering import next_token_logits
    from store.models import Feature

    (meta,) = lookup_saes(bundled, ["smol-l29"])
    reg = Registry(bundled, "cpu", 4096)
    model = reg.model(meta)
    handle = reg.sae(meta, model.lm)
    with Session(bundled) as s:
        rows = s.execute(select(Feature.index, Feature.max_act, Feature.logits).where(Feature.sae_id == meta.id)).all()
    # the three latents whose stored logit tables promote one token the most
    ranked = sorted((r for r in rows if (r.max_act or 0) > 0), key=lambda r: -r.logits["top"][0][1])[:3]
    prompt = [model.lm.bos_token_id, *model.tokenizer("The documentation of this module says that",
                                                       add_special_tokens=False)["input_ids"]]
    for index, _, logits in ranked:
        t = int(logits["top"][0][0])
        base, same = next_token_logits(model, prompt, [(handle, index, 0.0)])
        assert torch.equal(base, same)  # strength 0: exactly the default
        _, up = next_token_logits(model, prompt, [(handle, index, 4.0)])
        p0, p1 = torch.softmax(base, -1)[t].item(), torch.softmax(up, -1)[t].item()
        assert p1 > p0, f"latent {index}: p(token {t}) {p0:.3g} -> {p1:.3g}"
        _, down = next_token_logits(model, prompt, [(handle, index, -4.0)])
        assert torch.softmax(down, -1)[t].item() < p0
        # clamping the latent high keeps the SAE error and also promotes t
        _, clamped = next_token_logits(model, prompt, [(handle, index, 4.0)], method="clamp")
        assert torch.softmax(clamped, -1)[t].item() > p0
