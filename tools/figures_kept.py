"""Check that every figure of an earlier README is still in the documentation.

    python tools/figures_kept.py REV     # e.g. the commit before README was shortened

Takes every number of README.md at git revision REV and looks for it in today's README.md,
docs/*.md and comfyui/README.md: as the same number, or as a more precise one that rounds to it
(0.706 is kept by 0.7061); link targets are not figures. Prints the numbers not found, each with the line it stood in, and exits
1 if there are any.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def numbers(text: str) -> set[str]:
    """The numbers of `text`'s prose: link targets (paths, anchors) are not figures."""
    return {m.group(0) for m in NUMBER.finditer(re.sub(r"\]\([^)]*\)", "]", text))}


def kept(number: str, found: set[str]) -> bool:
    if number in found:
        return True
    if "." not in number:
        return False
    decimals = len(number.split(".")[1])
    half = 0.5 * 10**-decimals + 1e-12  # 0.8915 keeps 0.892 (rounded half up)
    return any(
        "." in f and len(f.split(".")[1]) > decimals and abs(float(f) - float(number)) <= half for f in found
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    old = subprocess.run(
        ["git", "show", f"{argv[0]}:README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "comfyui" / "README.md"]
    found = set().union(*(numbers(f.read_text()) for f in files if f.exists()))
    missing = {}
    for line in old.splitlines():
        for number in numbers(line):
            if not kept(number, found):
                missing.setdefault(number, line.strip())
    for number, line in sorted(missing.items()):
        print(f"{number}: {line[:120]}")
    print(f"{len(numbers(old))} numbers in README at {argv[0]}, {len(missing)} not found today")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
