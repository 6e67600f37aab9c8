"""Write tests/slow_tests.txt: the test functions left out of the fast tier (`pytest -m "not slow"`).

    .venv/bin/python -m pytest -q -n auto --dist worksteal -m "not full_size" --durations=0 > all.log
    .venv/bin/python tools/slow_tests.py all.log [--seconds 5]
    .venv/bin/python -m pytest -q -n auto --dist worksteal -m "not slow" --durations=0 > fast.log
    .venv/bin/python tools/slow_tests.py all.log fast.log

A function is slow when its setup + call + teardown times, summed over its parameters, reach
`--seconds` (default 5) in any of the logs. Why more than one log: a module fixture's setup is
charged to the first test that uses it, so once that test is left out, the next one in the fast
tier pays it; a second log, of the fast tier itself, finds those. tests/conftest.py marks every
function the list names `slow`; CI runs them all the same. Full-size tests are marked in their
files (`full_size`) and stay slow regardless.
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
    p.add_argument("logs", type=pathlib.Path, nargs="+")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    total: dict[str, float] = {}  # per function, the largest of its per-log sums
    for log in args.logs:
        in_log: dict[str, float] = collections.defaultdict(float)
        for line in log.read_text().splitlines():
            m = LINE.match(line)
            if m:
                in_log[m.group(2).split("[")[0]] += float(m.group(1))
        for name, seconds in in_log.items():
            total[name] = max(total.get(name, 0.0), seconds)
    slow = sorted(name for name, seconds in total.items() if seconds >= args.seconds)
    header = (
        f"# Test functions out of the fast tier: {args.seconds:g} s or more (all parameters) in the\n"
        f"# measured runs (the largest); written by tools/slow_tests.py from pytest --durations=0. One per line.\n"
    )
    OUT.write_text(header + "".join(f"{name}\n" for name in slow))
    kept = sum(s for n, s in total.items() if s < args.seconds)
    print(f"{len(slow)} slow functions ({sum(total[n] for n in slow):.0f} s); fast tier {kept:.0f} s")


if __name__ == "__main__":
    main()
