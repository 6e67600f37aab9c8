"""`sd-rebasin --help` and usage errors answer without importing torch or sd-mecha (the package's
import takes seconds), help still lists every command and option, and a command that runs has the
whole package (registrations included). What the help text writes out by hand (choices, block
orders) agrees with the modules that define them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.paused import REPO

from sd_mecha_rebasin.cli import commands

PROBE = """
import json, sys
from sd_rebasin_cli import main
sys.argv = ["sd-rebasin", *sys.argv[1:]]
code = main()
package = sys.modules.get("sd_mecha_rebasin")
print(json.dumps({
    "code": code,
    "torch": "torch" in sys.modules,
    "sd_mecha": "sd_mecha" in sys.modules,
    "rebasin": hasattr(package, "rebasin"),
}), file=sys.stderr)
"""
"""Runs the console script's entry point as pip's generated script does, then reports on stderr's
last line what it left imported."""


def run_console_script(*args: str) -> tuple[dict, str, str]:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stderr
    return json.loads(lines[-1]), proc.stdout, "\n".join(lines[:-1])


def test_help_lists_every_command_without_torch_or_sd_mecha():
    report, out, _ = run_console_script("--help")
    assert report == {"code": 0, "torch": False, "sd_mecha": False, "rebasin": False}
    for name in commands.cli.commands:
        assert f"  {name} " in out, name


@pytest.mark.parametrize("command", ["merge", "merge-many", "align", "inspect", "demo"])
def test_command_help_lists_every_option_without_torch_or_sd_mecha(command):
    report, out, _ = run_console_script(command, "--help")
    assert report["code"] == 0 and not report["torch"] and not report["sd_mecha"]
    for param in commands.cli.commands[command].params:
        for flag in param.opts if param.param_type_name == "option" else []:
            assert flag in out, (command, flag)


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "a.safetensors"], "Missing argument 'B'"),
        (["merge-many", "--start", "sideways", "-o", "x.safetensors"], "'sideways' is not one of"),
        (["nonsense"], "No such command 'nonsense'"),
    ],
)
def test_usage_errors_without_torch_or_sd_mecha(args, message):
    report, out, err = run_console_script(*args)
    assert report["code"] == 2 and not report["torch"] and not report["sd_mecha"]
    assert out == "" and err.count("\n") == 0 and message in err, err


def test_a_command_that_runs_imports_the_whole_package(tmp_path):
    """The deferred import is finished before the command: the package's public names and its
    registrations with sd-mecha are there (an unreadable file is still a one-line error)."""
    report, _, err = run_console_script("inspect", str(tmp_path / "missing.safetensors"))
    assert report == {"code": 1, "torch": True, "sd_mecha": True, "rebasin": True}
    assert err.startswith("sd-rebasin: error: ") and err.count("\n") == 0, err


def test_written_out_choices_agree_with_their_modules():
    from sd_mecha_rebasin.cli.jobs import DTYPES
    from sd_mecha_rebasin.mecha.blocks import block_names, block_order_text
    from sd_mecha_rebasin.search.matching import PRECISIONS

    assert commands.PRECISIONS == tuple(PRECISIONS)
    assert commands.OUTPUT_DTYPES == tuple(DTYPES)
    for family, config in (("SD1 and SD2", "sd1-ldm"), ("SD1 and SD2", "sd2-ldm"), ("SDXL", "sdxl-sgm")):
        assert commands.BLOCK_ORDERS[family] == (len(block_names(config)), block_order_text(config))
