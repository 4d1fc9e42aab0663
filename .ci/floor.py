"""Print pip constraints that pin every dependency of pyproject.toml to its declared lower bound.

    python .ci/floor.py pyproject.toml > constraints.txt

Used by .ci/run to test the oldest versions the project claims to support. Only ``>=`` bounds of the
main dependencies are pinned; the test extra floats (it is not part of what users install).
"""

import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*(,.*)?", requirement)
    if match is None:
        sys.exit(f"floor.py: no '>=' lower bound in {requirement!r}")
    print(f"{match.group(1)}=={match.group(2)}")
