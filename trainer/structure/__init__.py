"""The shape of a whole SAE: the map of its latents (layout.py, computed at publish) and its
multi-dimensional feature groups (groups.py, computed by the analysis, which has the codes)."""
