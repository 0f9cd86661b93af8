"""When worker processes may be forked."""

from __future__ import annotations

import subprocess
import sys
import threading

from observatory.core.processes import forking_is_safe

_ASK = """
import threading, sys
from observatory.core.processes import forking_is_safe
alone = forking_is_safe()
stop = threading.Event()
other = threading.Thread(target=stop.wait)
other.start()
beside_a_thread = forking_is_safe()
stop.set()
other.join()
print(alone, beside_a_thread, forking_is_safe())
"""


def test_forking_only_from_a_main_thread_running_alone() -> None:
    """A fresh interpreter (this one may keep other tests' daemon threads)."""
    asked = subprocess.run(
        [sys.executable, "-c", _ASK], capture_output=True, text=True, check=True, timeout=60
    )
    assert asked.stdout.split() == ["True", "False", "True"]


def test_no_forking_from_another_thread() -> None:
    answers: list[bool] = []
    worker = threading.Thread(target=lambda: answers.append(forking_is_safe()))
    worker.start()
    worker.join()
    assert answers == [False]
