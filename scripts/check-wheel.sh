#!/usr/bin/env bash
# The package as users get it: `python -m build` makes an sdist and, from it, a wheel; the wheel
# installs into a fresh venv (.venv-wheel) and runs `sd-rebasin demo` from outside the repository (so
# nothing is imported from the checkout); `twine check` says both render on PyPI. build and twine
# live only in this script's environments, not in the package's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dist=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$dist" "$work"' EXIT

python3 -m venv "$work/tools"
"$work/tools/bin/pip" install -q build twine
"$work/tools/bin/python" -m build -q --outdir "$dist" . >/dev/null
wheel=$(ls "$dist"/*.whl)
sdist=$(ls "$dist"/*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"

# The YAML configs (package data) must be in the wheel: without them `import sd_mecha_rebasin` fails.
"$work/tools/bin/python" - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
yamls = sorted(n for n in names if n.endswith(".yaml"))
for needed in ("sd_mecha_rebasin/architectures/families.yaml", "sd_mecha_rebasin/model_configs/"):
    if not any(n.startswith(needed) for n in yamls):
        sys.exit(f"check-wheel: {needed} is missing from the wheel (package data)")
if "sd_rebasin_cli.py" not in names:
    sys.exit("check-wheel: sd_rebasin_cli.py (the console script's module) is missing from the wheel")
members = tarfile.open(sdist).getnames()
if not any(m.endswith("/README.md") for m in members):
    sys.exit("check-wheel: README.md is missing from the sdist")
print(f"wheel: {len(names)} files, {len(yamls)} YAML configs")
EOF

# A bare torch requirement pulls a multi-GB CUDA build: the CPU wheel first, as scripts/setup.sh does.
rm -rf .venv-wheel
python3 -m venv .venv-wheel
.venv-wheel/bin/pip install -q --upgrade pip
.venv-wheel/bin/pip install -q "torch==2.13.0"
.venv-wheel/bin/pip install -q "$wheel"
(cd "$work" && "$repo/.venv-wheel/bin/sd-rebasin" demo --quiet && "$repo/.venv-wheel/bin/sd-rebasin" --help >/dev/null)
echo "wheel: sd-rebasin demo recovers the permutation outside the repository"

"$work/tools/bin/twine" check --strict "$wheel" "$sdist"
