#!/usr/bin/env bash
# The sd-mecha-facing tests (merge methods, `rebasin` interface dispatch, recipes and the .mecha
# round trip, block weights, MergeMany's method, model configs, the comfy-mecha extension) against
# each other sd-mecha this package supports, each in its own environment. comfy-mecha pins
# sd-mecha==1.1.6, so that is the version ComfyUI users have; .venv (scripts/setup.sh) holds the
# newest release (1.1.8). `dev` is sd-mecha's development branch (1.2.0) from the snapshot in
# ../shared/sd-mecha-dev (beside this checkout; see its SNAPSHOT.md), with the dependencies it adds
# (lycoris-lora) from the package registry. Each environment holds only its own sd-mecha (and those
# additions) and reuses .venv's other packages.
# usage: scripts/test-sd-mecha-versions.sh [VERSION|dev ...]   (default: 1.1.6); needs ./scripts/setup.sh --test first
# Without the snapshot folder, `dev` is skipped with one line (exit 0) outside CI and fails in CI (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(tests/test_merge_method.py tests/test_mecha_interface.py tests/test_recipes.py
       tests/test_recipes_many.py tests/test_blocks.py tests/test_merge_method_many.py
       tests/test_model_configs.py tests/test_comfyui_extension.py tests/test_sd_mecha_compat.py)
DEV_SNAPSHOT=../shared/sd-mecha-dev
MAIN_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for VERSION in "${@:-1.1.6}"; do
  if [[ $VERSION == dev ]]; then
    if [[ ! -f $DEV_SNAPSHOT/pyproject.toml ]]; then
      if [[ -n ${CI:-} ]]; then
        echo "sd-mecha dev: no snapshot at $DEV_SNAPSHOT (CI has shared/ beside the checkout)" >&2
        exit 1
      fi
      echo "sd-mecha dev: skipped, no snapshot at $DEV_SNAPSHOT (it comes with shared/, beside the checkout)"
      continue
    fi
    WANTED=$(sed -n 's/^version = "\(.*\)"/\1/p' "$DEV_SNAPSHOT/pyproject.toml")
  else
    WANTED=$VERSION
  fi
  ENV=".venv-sd-mecha-$VERSION"
  rm -rf "$ENV"
  python3 -m venv "$ENV"
  SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # after this environment's own packages: .venv's (with their .pth files, so the editable install works)
  echo "import site; site.addsitedir('$MAIN_SITE')" > "$SITE/zz_main_venv.pth"
  if [[ $VERSION == dev ]]; then
    # with its dependencies: pip sees .venv's through the .pth above and adds only what they lack
    "$ENV/bin/pip" install -q "$DEV_SNAPSHOT"
  else
    "$ENV/bin/pip" install -q --no-deps "sd-mecha==$VERSION"
  fi
  "$ENV/bin/python" -c "import importlib.metadata as m, sys; v = m.version('sd-mecha'); sys.exit(0 if v == '$WANTED' else f'sd-mecha {v} found, $WANTED wanted')"
  echo "sd-mecha $VERSION ($WANTED): ${#TESTS[@]} test files"
  "$ENV/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist worksteal "${TESTS[@]}"
done
