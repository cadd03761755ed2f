"""Files: run directories, atomic and sealed (self-checking) files (files.py), and the
content-addressed stage cache with its locks and checksums (cache.py)."""
