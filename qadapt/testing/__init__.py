"""The conformance kit and the toy models it runs on, for plugin authors and maintainers.

``check_backend(name, options)`` performs every cell a backend declares (:mod:`.conformance`); :mod:`.matrix` does it
for every backend and option set (``qadapt matrix --verify``); :mod:`.toy` builds tiny models, tokenizers and text
offline.
"""

from .conformance import CellResult, check_backend

__all__ = ["CellResult", "check_backend"]
