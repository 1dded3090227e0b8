"""Writers of tiny fake datasets in the exact on-disk formats (used by the tests)."""
