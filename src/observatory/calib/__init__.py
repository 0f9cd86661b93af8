"""Calibration: solution formats, the fit database, best-solution selection, fits and plots."""
