"""m2diff: MRI-guided low-dose PET enhancement with the M2Diff dual-pathway diffusion model.

The core package knows nothing of Flower; `client/` and `server/` adapt it.
Data flows one way: site folder -> dataset -> model -> train / sample -> evaluate -> report.
"""

__version__ = "0.1.0"
