#!/usr/bin/env python3
"""Rewrite the code dependencies (repro/*.py) of every stage in dvc.yaml from the imports (tests/test_dvc_deps.py).

Run it after adding, moving or importing a module: `python scripts/update-dvc-deps.py` (a test fails until it is run).
Other deps (data, models, YAML files) and every comment stay as they are.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_dvc_deps import stage_code_deps  # noqa: E402


def main() -> None:
    path = ROOT / "dvc.yaml"
    lines = path.read_text().splitlines(keepends=True)
    out, stage, in_deps = [], None, False
    for line in lines:
        m = re.match(r"^  (\w+):\s*$", line)
        if m:
            stage, in_deps = m.group(1), False
        if stage and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out += [f"      - {d}\n" for d in stage_code_deps(stage)]
            continue
        if in_deps and re.match(r"^      - repro/.*\.py\s*$", line):
            continue  # replaced above
        if in_deps and not line.startswith("      "):
            in_deps = False
        out.append(line)
    path.write_text("".join(out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
