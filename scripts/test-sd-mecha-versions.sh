#!/usr/bin/env bash
# The sd-mecha-facing tests (merge methods, `rebasin` interface dispatch, recipes and the .mecha
# round trip, block weights, MergeMany's method, model configs, the comfy-mecha extension) against
# each older sd-mecha this package supports, each in its own environment. comfy-mecha pins
# sd-mecha==1.1.6, so that is the version ComfyUI users have; .venv (scripts/setup.sh) holds the
# newest (1.1.8). Each environment holds only its own sd-mecha and reuses .venv's other packages.
# usage: scripts/test-sd-mecha-versions.sh [VERSION ...]   (default: 1.1.6); needs ./scripts/setup.sh --test first
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(tests/test_merge_method.py tests/test_mecha_interface.py tests/test_recipes.py
       tests/test_recipes_many.py tests/test_blocks.py tests/test_merge_method_many.py
       tests/test_model_configs.py tests/test_comfyui_extension.py)
MAIN_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for VERSION in "${@:-1.1.6}"; do
  ENV=".venv-sd-mecha-$VERSION"
  rm -rf "$ENV"
  python3 -m venv "$ENV"
  "$ENV/bin/pip" install -q --no-deps "sd-mecha==$VERSION"
  SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # after this environment's own packages: .venv's (with their .pth files, so the editable install works)
  echo "import site; site.addsitedir('$MAIN_SITE')" > "$SITE/zz_main_venv.pth"
  "$ENV/bin/python" -c "import importlib.metadata as m, sys; v = m.version('sd-mecha'); sys.exit(0 if v == '$VERSION' else f'sd-mecha {v} found, $VERSION wanted')"
  echo "sd-mecha $VERSION: ${#TESTS[@]} test files"
  "$ENV/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist worksteal "${TESTS[@]}"
done
