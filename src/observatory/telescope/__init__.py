"""Instrument facts (site, tiles, channels, freqspecs, sources) and the telescope simulator."""
