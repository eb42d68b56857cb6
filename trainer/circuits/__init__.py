"""Attribution graphs with circuit-tracer's semantics, on our LMs and transcoders.

transcoders.py: the transcoder set (one per block, mlp_in.L -> mlp_out.L); replacement.py: the local
replacement model of a prompt (frozen attention patterns and norm scales, error nodes); targets.py:
logit targets; attribute.py: the adjacency matrix from batched backward passes; graph.py: the Graph;
prune.py: influence, pruning and the replacement / completeness scores; export.py: the graph JSON
circuit-tracer's frontend reads; compute.py: one stored graph end to end from a transcoder set's
manifest (what `sae-atlas graph` and the graph worker run); steer.py: a feature node set or ablated,
and the top logits before and after, through the frozen replacement model.
"""
