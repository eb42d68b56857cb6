"""The live model: one inference service per device, and what the API needs to talk to it.

The service (`sae-atlas inference`, service.py) is its own process, so API workers never hold a
copy of a model. It loads LMs and published SAEs on first use and keeps them within a memory
budget (registry.py), and runs every request through one engine thread (batcher.py) that
micro-batches concurrent requests into shared forward passes: each pass hooks every site that
the batch's SAEs read, stopping after the deepest block (encode.py), and generation for steering
(steering.py) advances one token at a time between those passes. Steering from an attribution graph's
node (graph_steer.py) is one forward pass of its own, with the graph's transcoder loaded beside
the LM. Contrastive search pools each
text by its max activation and tests every latent of every SAE (contrastive.py).

API processes reach the service over a local port or Unix socket (client.py); requests are
validated once with the models in schemas.py, which both sides share. Live requests from
anonymous clients are rate limited per address (ratelimit.py).
"""
