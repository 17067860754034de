"""The Hub: downloads verified against huggingface_hub's cache, installs, pushes, model cards."""
