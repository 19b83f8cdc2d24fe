"""``m2diff prepare``: a hospital's raw export (DICOM series or NIfTI, native grids) -> a checked site.

spreadsheet (who is who) -> discover (which series is which) -> dicom_series (DICOM -> volume)
-> geometry (RAS/LPS, SimpleITK images) -> register (rigid MI, SimpleITK) -> subject
(resample, sidecar, qc) -> pipeline (the site, incremental) -> command (the CLI edge).
"""
