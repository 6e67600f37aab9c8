"""A real ComfyUI for tests: started headless on CPU from the snapshot in ``../shared/comfyui`` in the
environment that ``scripts/setup-comfyui.sh`` builds (``.venv-comfyui``), driven through its HTTP API.

Each server runs from a copy of the snapshot's ComfyUI tree in a folder the test owns, with
``--base-directory`` there too, so ``custom_nodes/``, ``models/``, ``output/``, ``user/`` and
``temp/`` belong to the test and the snapshot is never written to (no ``__pycache__`` either).
Custom nodes are given as folders (name -> source) and copied into ``custom_nodes/``;
``comfy_mecha_pack`` prepares comfy-mecha with extension files in its ``mecha_extensions/``.

    missing = what_is_missing()            # one line, or None
    with ComfyUI(tmp, {"comfy-mecha": comfy_mecha_pack(tmp / "packs", [EXTENSION]),
                       "my_nodes": repo / "comfyui"}) as server:
        shutil.copy(model, server.checkpoints / "A.safetensors")   # before start, or any time for
        info = server.object_info()                                   # loaders listing files
        entry = server.run(prompt)                                    # API-format workflow
        files = server.outputs("prefix")                              # what a save node wrote
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
SNAPSHOT = pathlib.Path(os.environ.get("COMFYUI_SNAPSHOT", REPO.parent / "shared" / "comfyui")).resolve()
"""The snapshot folder (ComfyUI/ and comfy-mecha/, see its SNAPSHOT.md); $COMFYUI_SNAPSHOT overrides."""
ENV_PYTHON = REPO / ".venv-comfyui" / "bin" / "python"
"""The environment ComfyUI runs in (scripts/setup-comfyui.sh)."""
EXTENSION = REPO / "comfyui" / "mecha_extensions" / "sd_mecha_rebasin.py"
"""This package's comfy-mecha extension file."""

START_TIMEOUT = 900.0
"""Seconds to wait for the server to answer: it starts in ~20 s on an idle machine; the limit only
catches a server that never comes up (a crash is noticed at once: the process exits)."""
RUN_TIMEOUT = 3600.0
"""Default seconds to wait for one workflow: a hang guard, not a speed requirement."""

_LAZY_CASTING_IMPORT = "from comfy.model_patcher import LazyCastingParam\n"
_LAZY_CASTING_GUARDED = (
    "try:  # guarded by the sd-mecha-rebasin tests: ComfyUI 0.3.64 lacks it (newer ComfyUI has it)\n"
    "    from comfy.model_patcher import LazyCastingParam\n"
    "except ImportError:\n"
    "    LazyCastingParam = None\n"
)

_MERGE_CHECKPOINTING_STAND_IN = '''"""Stand-in written by the sd-mecha-rebasin tests: comfy-mecha resolves a `merge_checkpointing`
merge method that its own mecha_extensions/ folder defines upstream, and the snapshot has no such
folder. Pass-through (no cache): the tests never turn a node's merge_checkpointing on."""
from typing import TypeVar

from sd_mecha import Parameter, Return, StateDict, merge_method

T = TypeVar("T")


@merge_method
def merge_checkpointing(a: Parameter(StateDict[T]), **kwargs) -> Return(T):
    return a[kwargs["key"]]
'''


def what_is_missing() -> str | None:
    """None when a real ComfyUI can be started here, else one line naming what is missing."""
    for path in (SNAPSHOT / "ComfyUI" / "main.py", SNAPSHOT / "comfy-mecha" / "__init__.py"):
        if not path.is_file():
            return f"the ComfyUI snapshot is not here ({path} missing; see ../shared/comfyui/SNAPSHOT.md)"
    if not ENV_PYTHON.is_file():
        return f"the ComfyUI environment is not here ({ENV_PYTHON} missing; run scripts/setup-comfyui.sh)"
    return None


def _copy_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.pyc"), symlinks=True)


def comfy_mecha_pack(folder: pathlib.Path, extensions: Iterable[pathlib.Path] = (EXTENSION,)) -> pathlib.Path:
    """A copy of the snapshot's comfy-mecha in `folder/comfy-mecha`, ready for this ComfyUI, with the
    given extension files in its `mecha_extensions/`. Returns the copy, to pass as a custom node.

    Adapted in the copy only: comfy-mecha 1.2.60 imports `LazyCastingParam` from
    `comfy.model_patcher`, which ComfyUI 0.3.64 lacks; comfy-mecha's merge nodes never use it, so the
    import is guarded (SNAPSHOT.md). The snapshot has no `mecha_extensions/` folder, which upstream
    holds `merge_checkpointing.py` (the merge method comfy-mecha resolves at import and wraps a node's
    output in when its `merge_checkpointing` input is on): the folder is created here with a
    pass-through stand-in of that method (a node's `merge_checkpointing` stays off in the tests)."""
    pack = folder / "comfy-mecha"
    _copy_tree(SNAPSHOT / "comfy-mecha", pack)
    merge_nodes = pack / "nodes" / "merge_nodes.py"
    text = merge_nodes.read_text()
    if _LAZY_CASTING_IMPORT in text:
        merge_nodes.write_text(text.replace(_LAZY_CASTING_IMPORT, _LAZY_CASTING_GUARDED, 1))
    (pack / "mecha_extensions").mkdir(exist_ok=True)
    if not (pack / "mecha_extensions" / "merge_checkpointing.py").exists():
        (pack / "mecha_extensions" / "merge_checkpointing.py").write_text(_MERGE_CHECKPOINTING_STAND_IN)
    for extension in extensions:
        shutil.copy(extension, pack / "mecha_extensions" / pathlib.Path(extension).name)
    return pack


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyUIError(RuntimeError):
    """The server refused a workflow, a node failed, or the server died; the message says which."""


class ComfyUI:
    """One ComfyUI server in `folder` (created): `folder/ComfyUI` (the copied tree) is also the base
    directory; `custom_nodes` maps a pack name to a source folder copied to `custom_nodes/<name>`.

    `env` adds environment variables for the server (e.g. PYTHONPATH for a test-only module);
    `args` adds command-line options. Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        folder: pathlib.Path,
        custom_nodes: Mapping[str, pathlib.Path] = {},  # noqa: B006 (never mutated)
        *,
        env: Mapping[str, str] = {},  # noqa: B006
        args: Sequence[str] = (),
        python: pathlib.Path = ENV_PYTHON,
    ) -> None:
        self.folder = pathlib.Path(folder)
        self.root = self.folder / "ComfyUI"
        self.custom_nodes = dict(custom_nodes)
        self.env = dict(env)
        self.args = list(args)
        self.python = pathlib.Path(python)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self._prepare()

    # -- the folders a test fills or reads -------------------------------------------------------
    @property
    def models(self) -> pathlib.Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.models / "checkpoints"

    @property
    def output(self) -> pathlib.Path:
        return self.root / "output"

    def _prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.root.exists():
            _copy_tree(SNAPSHOT / "ComfyUI", self.root)
        nodes = self.root / "custom_nodes"
        nodes.mkdir(exist_ok=True)
        for name, source in self.custom_nodes.items():
            target = nodes / name
            if target.exists():
                shutil.rmtree(target)
            _copy_tree(pathlib.Path(source), target)
        for sub in ("checkpoints", "diffusion_models", "clip", "vae"):
            (self.models / sub).mkdir(parents=True, exist_ok=True)
        self.output.mkdir(exist_ok=True)

    # -- process -----------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> ComfyUI:
        self.port = free_port()
        command = [
            str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.root),
            *self.args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(
            CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1"
        )
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ComfyUIError(
                    f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self._get("/system_stats", timeout=5)
                return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyUIError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=60)

    def __enter__(self) -> ComfyUI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- HTTP --------------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        assert self.port is not None, "the server is not started"
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self._url(path), timeout=timeout) as response:
            return json.loads(response.read())

    def _post(self, path: str, body: Mapping[str, Any], timeout: float = 60) -> Any:
        request = urllib.request.Request(
            self._url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """`/object_info` (every node class) or `/object_info/<class>` (that class only)."""
        if node_class is None:
            return self._get("/object_info", timeout=300)
        return self._get(f"/object_info/{urllib.request.quote(node_class, safe='')}", timeout=300)

    def queue(self, prompt: Mapping[str, Any]) -> str:
        """POST an API-format workflow; returns its prompt id. A refused workflow (unknown node,
        bad input) raises ComfyUIError with ComfyUI's node errors."""
        try:
            answer = self._post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raise ComfyUIError(
                f"ComfyUI refused the workflow ({e.code}): {e.read().decode(errors='replace')}"
            ) from e
        if answer.get("node_errors"):
            raise ComfyUIError(f"ComfyUI refused the workflow: {json.dumps(answer['node_errors'])}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """The workflow's `/history/<id>` entry once it has finished; a failed node raises
        ComfyUIError with the execution error (its message and traceback), as does a dead server."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success" or not status.get("completed"):
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = "\n".join(
                        f"{e.get('node_type')} ({e.get('node_id')}): {e.get('exception_type')}: "
                        f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}"
                        for e in errors
                    ) or json.dumps(status)
                    raise ComfyUIError(f"the workflow failed: {detail}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyUIError(f"the workflow had not finished after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def run(self, prompt: Mapping[str, Any], timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """queue() then wait(): the finished workflow's history entry."""
        return self.wait(self.queue(prompt), timeout)

    def outputs(self, prefix: str, suffix: str = ".safetensors") -> list[pathlib.Path]:
        """Files a save node wrote under `output/` whose name starts with `prefix` (sorted)."""
        return sorted(p for p in self.output.rglob(f"{prefix}*{suffix}") if p.is_file())
