"""OCI registries as a source and a destination of adapters.

An adapter version travels as a ModelPack artifact (one layer per file, the base model and the
lineage in annotations): :mod:`.layout` builds and reads the manifest, :mod:`.client` speaks to a
registry (through oras-py's session and credentials), :mod:`.push` publishes a registered version,
:mod:`.pull` fetches and verifies an artifact and hands it to the one install sequence.
"""
