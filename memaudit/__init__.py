"""memaudit: audit text-to-image diffusion models for memorization.

The public API is small on purpose (in the spirit of clean-fid): build an index, generate,
detect, screen, audit. See README.md for a tour and docs/ for the reference.
"""

__version__ = "0.1.0"
