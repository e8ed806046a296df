"""Per-layer per-example gradient statistics (BackPACK-style), installed as msvag_mb.extensions."""
