"""Print vsteer's requirements (core + the named extras) from pyproject.toml, one per line.

Used by deploy/Dockerfile to install the dependencies in a layer of their own, before any
source is copied:  python requirements.py pyproject.toml serve > /tmp/requirements.txt
"""

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return list(dict.fromkeys(reqs))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: requirements.py PYPROJECT [EXTRA...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
