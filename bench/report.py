"""What every benchmark script does with its result: stamp it with the command that reproduces it and
the date, print it as JSON, and write it to ``--out`` when given."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def stamp() -> dict:
    """``command`` (this script and its arguments, run from the repository root) and ``date``."""
    return {"command": f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d")}


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as JSON and write it to ``out`` (its folder made) when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
