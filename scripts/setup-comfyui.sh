#!/usr/bin/env bash
# Create .venv-comfyui: the environment the real-ComfyUI tests (tests/test_comfyui_real.py) start
# ComfyUI in. It holds ComfyUI's requirements, comfy-mecha's (sd-mecha==1.1.6) and this package
# (editable), with torch pinned to the CPU wheel by a constraints file so that nothing replaces it.
# torchaudio is left out (ComfyUI starts without it). torchvision is installed without its
# dependencies: the only build for torch 2.13.0 is a CUDA one whose compiled ops do not load here,
# so a module loaded from a .pth file declares the two op schemas (torchvision::nms, ::qnms) that
# its Python part registers meta kernels for, just before torchvision is first imported. ComfyUI
# needs only torchvision.transforms (see ../shared/comfyui/SNAPSHOT.md).
# usage: scripts/setup-comfyui.sh [SNAPSHOT_DIR]   (default: $COMFYUI_SNAPSHOT or ../shared/comfyui)
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPSHOT=${1:-${COMFYUI_SNAPSHOT:-../shared/comfyui}}
for REQUIREMENTS in "$SNAPSHOT/ComfyUI/requirements.txt" "$SNAPSHOT/comfy-mecha/requirements.txt"; do
  [ -f "$REQUIREMENTS" ] || { echo "setup-comfyui: $REQUIREMENTS not found" >&2; exit 1; }
done
ENV=.venv-comfyui
rm -rf "$ENV"
python3 -m venv "$ENV"
PIP=("$ENV/bin/python" -m pip)
printf 'torch==2.13.0\nsd-mecha==1.1.6\n' > "$ENV/constraints.txt"
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q -c "$ENV/constraints.txt" "torch==2.13.0"
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$SNAPSHOT/ComfyUI/requirements.txt" > "$ENV/comfyui-requirements.txt"
"${PIP[@]}" install -q -c "$ENV/constraints.txt" -r "$ENV/comfyui-requirements.txt" \
  -r "$SNAPSHOT/comfy-mecha/requirements.txt"
"${PIP[@]}" install -q --no-deps "torchvision==0.28.0"
SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/_torchvision_op_schemas.py" <<'PY'
"""Declares torchvision's nms/qnms op schemas before torchvision is first imported (its CUDA build's
compiled ops do not load beside the CPU torch wheel). Written by scripts/setup-comfyui.sh."""
import importlib.abc
import sys

_LIBRARY = None  # kept alive: the schemas go away with the Library object


class _DeclareBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        global _LIBRARY
        if name == "torchvision" and _LIBRARY is None:
            sys.meta_path.remove(self)
            import torch

            _LIBRARY = torch.library.Library("torchvision", "DEF")
            _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _DeclareBeforeTorchvision())
PY
echo "import _torchvision_op_schemas" > "$SITE/_torchvision_op_schemas.pth"
"${PIP[@]}" install -q -c "$ENV/constraints.txt" -e .
"$ENV/bin/python" - <<'PY'
import importlib.metadata as m
import torch, torchvision.transforms, sd_mecha, sd_mecha_rebasin  # noqa: F401,E401
assert m.version("sd-mecha") == "1.1.6", m.version("sd-mecha")
assert torch.__version__.startswith("2.13.0") and not torch.cuda.is_available(), torch.__version__
print(f"setup-comfyui: torch {torch.__version__}, sd-mecha {m.version('sd-mecha')}, sd-mecha-rebasin ready")
PY
