"""comfyui/mecha_extensions/sd_mecha_rebasin.py, loaded the way comfy-mecha 1.1.6 loads its extension
folder (each `mecha_extensions/*.py` executed through `importlib.util.spec_from_file_location` as
`mecha_extensions.<stem>`, then one node per `merge_methods.get_all()` entry that is neither a
converter nor an interface implementation). Runs in a child process so sd-mecha's registries start
empty, as in a fresh ComfyUI; ComfyUI itself is not needed: the node list and each node's inputs are
computed with the same sd-mecha calls comfy-mecha's `make_comfy_node_class` makes."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

EXTENSION = (
    pathlib.Path(__file__).resolve().parents[1] / "comfyui" / "mecha_extensions" / "sd_mecha_rebasin.py"
)

LOADER = r"""
import importlib.util, json, pathlib, sys
from types import ModuleType

folder = pathlib.Path(sys.argv[1])
sys.modules["mecha_extensions"] = ModuleType("mecha_extensions")
for path in sorted(folder.iterdir()):
    if path.suffix != ".py":
        continue
    name = f"mecha_extensions.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

from sd_mecha.extensions import merge_methods

converters = {m.identifier for m in merge_methods.get_all_converters()}
implementations = {
    c[0].identifier for m in merge_methods.get_all() if m.interface is not None for c in m.interface.candidates
}
nodes = {}
for m in merge_methods.get_all():
    if m.identifier in converters | implementations or m.identifier == "merge_checkpointing":
        continue
    names = m.get_param_names()
    defaults = m.get_default_args()
    m.get_input_merge_spaces().as_dict(0)
    n_required = len(names.args) - len(defaults.args)
    nodes[m.get_identifier()] = {
        "required": list(names.args[:n_required]),
        "optional": dict(zip(names.args[n_required:], [repr(v) for v in defaults.args]))
        | {name: repr(defaults.kwargs[i]) for i, name in names.kwargs.items() if i in defaults.kwargs},
        "varargs": names.has_varargs(),
    }
print(json.dumps({"nodes": nodes, "implementations": sorted(implementations)}))
"""


def _load_like_comfy_mecha(tmp_path: pathlib.Path) -> dict:
    folder = tmp_path / "mecha_extensions"
    folder.mkdir()
    shutil.copy(EXTENSION, folder / EXTENSION.name)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_extension_registers_the_nodes_comfy_mecha_builds(tmp_path):
    """The pair method, MergeMany and sd-mecha's `rebasin` interface get nodes with every parameter;
    our exact `rebasin` implementations are interface candidates (no node of their own)."""
    loaded = _load_like_comfy_mecha(tmp_path)
    nodes = loaded["nodes"]

    pair = nodes["git_rebasin"]
    assert pair["required"] == ["a", "ref"]
    assert {"iters", "seed", "threads", "device", "precision"} <= set(pair["optional"])
    assert pair["optional"]["iters"] == "100" and pair["optional"]["device"] == "'cpu'"

    many = nodes["git_rebasin_many"]
    assert many["varargs"] and many["required"] == []
    assert {"weights", "ref", "member", "max_passes", "iters", "seed"} <= set(many["optional"])

    assert "rebasin" in nodes  # the interface: users pick it, dispatch picks our exact candidate
    ours = {f"git_rebasin_{c}" for c in ("sd1_ldm", "sd2_ldm", "sdxl_sgm")}
    assert ours <= set(loaded["implementations"])
    assert not ours & set(nodes)


def test_without_the_extension_there_is_no_git_rebasin_node(tmp_path):
    """Control: the nodes above come from executing the extension file, not from sd-mecha itself."""
    folder = tmp_path / "mecha_extensions"
    folder.mkdir()
    (folder / "other.py").write_text("x = 1\n")
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])["nodes"]
    assert "git_rebasin" not in nodes and "git_rebasin_many" not in nodes
