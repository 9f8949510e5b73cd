"""One module per reward family; each exposes ``load(weights=None, device=None, dtype=None, **options)``."""
