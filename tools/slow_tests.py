"""Write tests/slow_tests.txt: the test functions left out of the fast tier (`pytest -m "not slow"`).

    .venv/bin/python -m pytest -q -n auto --dist loadgroup --durations=0 > durations.log
    .venv/bin/python tools/slow_tests.py durations.log [--seconds 8]

A function is slow when its setup + call + teardown times, summed over its parameters, reach
`--seconds` (default 8). tests/conftest.py marks every function the list names `slow`; CI runs them
all the same. Full-size tests are marked in their files (`full_size`) and stay slow regardless.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

LINE = re.compile(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S+)")
OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "slow_tests.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=pathlib.Path)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    total: dict[str, float] = collections.defaultdict(float)
    for line in args.log.read_text().splitlines():
        m = LINE.match(line)
        if m:
            total[m.group(2).split("[")[0]] += float(m.group(1))
    slow = sorted(name for name, seconds in total.items() if seconds >= args.seconds)
    header = (
        f"# Test functions out of the fast tier: {args.seconds:g} s or more (all parameters) in the\n"
        f"# measured run; written by tools/slow_tests.py from pytest --durations=0. One per line.\n"
    )
    OUT.write_text(header + "".join(f"{name}\n" for name in slow))
    kept = sum(s for n, s in total.items() if s < args.seconds)
    print(f"{len(slow)} slow functions ({sum(total[n] for n in slow):.0f} s); fast tier {kept:.0f} s")


if __name__ == "__main__":
    main()
