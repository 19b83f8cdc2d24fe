"""``m2diff prepare``: a hospital's raw export (DICOM series or NIfTI, native grids) -> a checked site.

discover (which series is which) -> dicom_series / volumes (read, canonical orientation)
-> register (rigid MI, SimpleITK) -> subject (resample, sidecars, QC) -> pipeline (the site,
incremental) -> command (the CLI edge).
"""
