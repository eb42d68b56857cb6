"""SAE Atlas trainer: load an LM, stream activations, train and evaluate SAEs, analyse and publish them."""
