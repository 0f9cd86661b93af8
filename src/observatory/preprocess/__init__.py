"""Conversion engine: raw MWA visibilities to calibrated, averaged uvfits / measurement sets."""
