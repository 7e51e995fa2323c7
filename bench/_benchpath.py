"""Import first in every bench script: drops this folder from ``sys.path``.

``bench/fedspine.py`` is named after the package, so while this folder is on the path (it is, for any
script run from it) ``import fedspine`` would find that script instead of the package.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
