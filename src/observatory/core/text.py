"""Numbers as people type them (ASCII digits only) and read them (sizes).

``str.isdecimal`` and ``int`` also take other scripts' digits (``１２`` is 12 to both), so a
check with ``isdecimal`` alone lets an obsid or a job id through in a form no other tool of
the observatory (nor the database's text search) reads as that number. Both checks also
stop at ``MAX_DIGITS``: ``int`` raises for a text of over 4,300 digits, and a caller checking
a range after them would otherwise fail with that error instead of its own message.
"""

from __future__ import annotations

import re

#: More digits than any number the services take, far fewer than ``int`` refuses.
MAX_DIGITS = 1000

_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")


def is_ascii_digits(text: str) -> bool:
    """Whether ``text`` is 1 to ``MAX_DIGITS`` of the ASCII digits 0-9 and nothing else."""
    return text.isascii() and text.isdecimal() and len(text) <= MAX_DIGITS


def is_ascii_integer(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits (at most ``MAX_DIGITS``) with an
    optional sign (``-3``, ``+5``)."""
    return _INTEGER.fullmatch(text) is not None


def size_text(size_bytes: float) -> str:
    """``20 kB``, ``1.5 MB``, ``2.1 GB``: a file's size for people (decimal units, as
    the products' sizes are given elsewhere in MB of 10^6 bytes)."""
    if size_bytes < 1000:
        return f"{size_bytes:.0f} bytes"
    text = ""
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        value = size_bytes / scale
        # Rounded first: 999,600 bytes is 1.0 MB, not 1000 kB.
        text = f"{value:.{0 if value >= 99.95 else 1}f} {unit}"
        if float(text.split()[0]) < 1000:
            break
    return text
