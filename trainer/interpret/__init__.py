"""Interpretation that needs no LM: sentence embeddings, token-pattern explanations, the embedding scorer.

- embedder: the sentence-embedding model (the bundled all-MiniLM-L6-v2, any transformers model,
  or an OpenAI-compatible /embeddings endpoint), mean-pooled and L2-normalised vectors;
- token_pattern: an explanation for every latent from its dashboard statistics;
- windows: the held-out activating and the non-activating windows each latent is scored on;
- embedding_scorer: AUROC of cosine similarity between an explanation and those windows, and the
  shuffled-explanation baseline;
- at_publish: the publish step that writes and scores a token-pattern explanation for every latent.

It lives in trainer/ because publishing uses it; the auto-interp worker (app/autointerp) uses the
same modules for LM explanations.
"""
