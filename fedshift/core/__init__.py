"""L0, the core vocabulary: errors, the registry, parameter base classes, random streams, tensor helpers, safe
checkpoint IO and the version. Imports nothing of fedshift (tests/test_layers.py)."""
