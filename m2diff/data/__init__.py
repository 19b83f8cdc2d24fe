"""Site data: layout, validation, slices and the cohort simulator."""
