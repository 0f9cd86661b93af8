"""observatory-services: the data services of an MWA-style radio observatory."""

__version__ = "0.2.0"
