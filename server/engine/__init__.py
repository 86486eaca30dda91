"""Generation backends. ``hf`` runs transformers models in this process."""
