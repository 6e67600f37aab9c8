"""Run sd-mecha's own published tests twice: plain, and with `sd_mecha_rebasin` imported first.

    python tools/run_sd_mecha_tests.py [SDIST.tar.gz]

The tests are those shipped in the sd-mecha source distribution on PyPI for the installed version
(without SDIST, `pip download --no-deps --no-binary :all: sd-mecha==<installed>` fetches it; that
needs the network). They are extracted into a temporary folder and run against the *installed*
sd-mecha (not the sdist's copy of the package), once as they are and once with pytest's
`-p sd_mecha_rebasin` (which imports the plugin before any test: its configs, `git_rebasin`, the
`rebasin` implementations and the dispatch order are then in place). Prints the outcome counts of
both runs; exits 0 only when every test has the same outcome in both.

sd-mecha 1.1.8's sdist ships tests/test_merge_context.py and tests/test_missing_key_handler.py but
not the tests/stubs/ module that one test of the latter names, so that test fails in both runs.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]


def fetch_sdist(folder: pathlib.Path) -> pathlib.Path:
    """The sd-mecha sdist of the installed version, downloaded into `folder`."""
    version = importlib.metadata.version("sd-mecha")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"sd-mecha=={version}", "-d", str(folder)],
        check=True,
    )  # fmt: skip
    return next(folder.glob("sd_mecha-*.tar.gz"))


def extract_tests(sdist: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Only the sdist's `tests/` folder, so that `import sd_mecha` finds the installed package."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isreg()]
        if not members:
            raise SystemExit(f"{sdist}: no tests/ folder in this sdist")
        tar.extractall(folder, members=members, filter="data")
    return next(folder.iterdir())


def run_pytest(root: pathlib.Path, report: pathlib.Path, plugin: bool) -> dict[str, str]:
    """Test id -> outcome (passed, failed, error, skipped) of one pytest run in `root`."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "tests"]
    if plugin:
        args[3:3] = ["-p", "sd_mecha_rebasin"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(args, cwd=root, env=env, check=False)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return outcomes


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="sd_mecha_tests_") as tmp:
        tmp_path = pathlib.Path(tmp)
        sdist = pathlib.Path(argv[0]) if argv else fetch_sdist(tmp_path)
        root = extract_tests(sdist, tmp_path / "src")
        plain = run_pytest(root, tmp_path / "plain.xml", plugin=False)
        with_plugin = run_pytest(root, tmp_path / "plugin.xml", plugin=True)
    for name, outcomes in (("without sd_mecha_rebasin", plain), ("with sd_mecha_rebasin", with_plugin)):
        counts = collections.Counter(outcomes.values())
        print(f"{sdist.name} {name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    differ = sorted(t for t in plain.keys() | with_plugin.keys() if plain.get(t) != with_plugin.get(t))
    for test in differ:
        print(f"DIFFERENT: {test}: {plain.get(test)} without the plugin, {with_plugin.get(test)} with it")
    print("same outcomes with and without the plugin" if not differ else f"{len(differ)} outcomes differ")
    return 1 if differ or not plain else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
