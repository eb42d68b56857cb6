"""SAE Atlas: the store, the web explorer, the REST API and the auto-interp workers."""

__version__ = "0.1.0"
