"""Auto-interpretation: a durable job queue, workers, explainer/judge backends, prompts and scorers."""
