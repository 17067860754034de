"""Compatibility: base-model fingerprints and the checks of adapters against bases and engines."""
