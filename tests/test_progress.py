"""What a person sees while a merge works: a moving bar for every phase, ETAs over known work only.

`Progress` is driven here with a recorded event sequence (its bars' totals and counts asserted),
and a tiny real merge checks that the events come in order with the right counts. No assert
depends on timing.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import shutil
import sys

import pytest
from support.demo_files import write_demo_pair

from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.cli.jobs import RunOptions, run
from sd_mecha_rebasin.cli.progress import Progress
from sd_mecha_rebasin.common import events
from sd_mecha_rebasin.mecha.merge_method import bound_keys
from sd_mecha_rebasin.search.matching import SweepStats


class RecordingProgress(Progress):
    """`Progress` that keeps every bar it opened."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made = []

    def _bar(self, **kwargs):
        bar = super()._bar(**kwargs)
        self.made.append(bar)
        return bar


SPACES = 134
MAX_ITER = 100


def _stats(sweep: int, objective: float, changed: int) -> SweepStats:
    return SweepStats(sweep, objective, changed, SPACES, 0.25, 1.0)


def test_progress_shows_every_phase_with_known_totals():
    out = io.StringIO()
    p = RecordingProgress(enabled=True, expect_prepass=True, file=out)
    p("phase_start", {"phase": "scan", "total": 40, "unit": "key"})
    p("phase", {"phase": "scan", "done": 25})
    assert (p.phase_bar.total, p.phase_bar.n) == (40, 25)
    p("phase_end", {"phase": "scan"})
    assert p.phase_bar is None

    # sd-mecha opens its key bar before it runs the pre-pass in its first key: held back
    keys = p.tqdm_factory()(total=30)
    p("phase_start", {"phase": "read", "total": 12, "unit": "key"})
    p("phase", {"phase": "read", "done": 5, "bytes": 3 * 2**30})
    assert (p.phase_bar.total, p.phase_bar.n) == (12, 5)
    assert p.key_bar is None
    p("phase", {"phase": "read", "done": 12, "bytes": 6 * 2**30})
    p("phase_end", {"phase": "read"})
    p("prepass_start", {"spaces": SPACES, "max_iter": MAX_ITER})
    p("phase_start", {"phase": "start", "total": 2 * 12 + SPACES, "unit": "step"})
    p("phase", {"phase": "start", "done": 100})
    assert (p.phase_bar.total, p.phase_bar.n) == (158, 100)
    p("phase_end", {"phase": "start"})

    p("sweep_start", {"sweep": 1, "total": SPACES, "objective": 10.0})
    p("solve", {"sweep": 1, "done": 60, "total": SPACES, "objective": 10.0})
    assert (p.sweep_bar.total, p.sweep_bar.n) == (SPACES, 60)
    p("solve", {"sweep": 1, "done": 90, "total": SPACES, "objective": 12.5})
    assert p.sweep_bar.n == 90 and "objective 12.5" in str(p.sweep_bar)
    p("sweep", {"stats": _stats(1, 13.0, 7)})
    assert p.sweep_bar is None
    p("sweep_start", {"sweep": 2, "total": SPACES, "objective": 13.0})
    p("solve", {"sweep": 2, "done": 20, "total": SPACES, "objective": 13.0})
    keys.update(1)  # another worker thread finished a key meanwhile
    p("sweep", {"stats": _stats(2, 13.0, 0)})
    p("prepass_end", {"result": "the result", "seconds": 4.5})
    assert (p.key_bar.total, p.key_bar.n) == (30, 1)
    keys.update(29)
    keys.close()
    assert p.key_bar is None and (p.result, p.prepass_seconds) == ("the result", 4.5)

    p("phase_start", {"phase": "write", "total": 5000, "unit": "B"})
    p("phase", {"phase": "write", "done": 5000})
    p("phase_end", {"phase": "write"})
    p.close()

    # one bar per phase and per sweep, in order; no bar ever counts sweeps up to max_iter
    totals = [bar.total for bar in p.made]
    assert totals == [40, 12, 158, SPACES, SPACES, 30, 5000]
    assert MAX_ITER not in totals
    assert [bar.n for bar in p.made] == [25, 12, 100, SPACES, SPACES, 30, 5000]
    text = out.getvalue()
    for label in (
        "checking A and B for NaN/Inf",
        "re-basin: reading A and B",
        "6.00 GiB held",
        "re-basin: starting point",
        "re-basin sweep 1",
        "objective 13 (+3), 7 changed, distance 0.2500",
        "re-basin sweep 2",
        "objective 13 (+0), 0 changed",
        "keys",
        "writing the output",
    ):
        assert label in text, label
    assert f"/{MAX_ITER}" not in text


def test_disabled_progress_shows_nothing_and_keeps_the_result():
    out = io.StringIO()
    p = RecordingProgress(enabled=False, expect_prepass=True, file=out)
    keys = p.tqdm_factory()(total=3)
    for event, data in [
        ("phase_start", {"phase": "read", "total": 2, "unit": "key"}),
        ("phase", {"phase": "read", "done": 2}),
        ("prepass_start", {"spaces": 3, "max_iter": 10}),
        ("sweep_start", {"sweep": 1, "total": 3, "objective": 0.0}),
        ("solve", {"sweep": 1, "done": 3, "total": 3, "objective": 0.0}),
        ("sweep", {"stats": SweepStats(1, 0.0, 0, 3, 0.0, 0.0)}),
        ("prepass_end", {"result": "r", "seconds": 1.0}),
    ]:
        p(event, data)
    keys.update(3)
    keys.close()
    p.close()
    assert p.made == [] and out.getvalue() == "" and p.result == "r"


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("progress"))


def _check_phase(received, phase: str, total: int) -> int:
    """The events of one phase are start, done = 1..total in steps, end; returns the index after it."""
    names = [e for e, _ in received]
    i = next(i for i, (e, d) in enumerate(received) if e == "phase_start" and d["phase"] == phase)
    assert received[i][1]["total"] == total, phase
    end = names.index("phase_end", i)
    assert received[end][1] == {"phase": phase}
    done = [d["done"] for e, d in received[i + 1 : end]]
    assert all(e == "phase" for e, _ in received[i + 1 : end]), phase
    assert done == sorted(done) and done[-1] == total and len(set(done)) == len(done), phase
    return end + 1


def test_a_tiny_merge_reports_every_phase_in_order(demo_pair, tmp_path):
    a, b = demo_pair
    received = []
    output = tmp_path / "merged.safetensors"
    with events.listening(lambda event, data: received.append((event, dict(data)))):
        result = run("merge", a, b, output, RunOptions(threads=1, progress=False, quiet=True))
    names = [e for e, _ in received]

    from sd_mecha_rebasin.files.checkpoint import open_checkpoint

    n_keys = sum(len(open_checkpoint(p).shapes) for p in (a, b))
    after_scan = _check_phase(received, "scan", n_keys)
    assert names[0] == "phase_start" and received[0][1]["phase"] == "scan"

    bound = len(bound_keys("sd1-ldm") & set(open_checkpoint(a).shapes))
    after_read = _check_phase(received, "read", bound)
    assert after_read > after_scan
    assert received[after_read - 2][1]["bytes"] > 0
    assert received[after_read] == ("prepass_start", {"spaces": result.permutations, "max_iter": 100})
    spaces = result.permutations
    after_start = _check_phase(received, "start", 2 * bound + spaces)
    assert after_start == after_read + 1 + 2 + (2 * bound + spaces)

    # the sweeps: each visits every permutation, in order, then reports its stats
    sweeps = [i for i, e in enumerate(names) if e == "sweep_start"]
    assert len(sweeps) == result.sweeps >= 1 and sweeps[0] == after_start
    for number, i in enumerate(sweeps, 1):
        assert received[i][1]["sweep"] == number and received[i][1]["total"] == spaces
        end = names.index("sweep", i)
        solves = received[i + 1 : end]
        assert all(e == "solve" and d["sweep"] == number and d["total"] == spaces for e, d in solves)
        done = [d["done"] for _, d in solves]
        assert done == sorted(done) and len(set(done)) == len(done) and done[-1] <= spaces
        stats = received[end][1]["stats"]
        assert stats.sweep == number and 0 < stats.solved <= spaces and len(solves) == stats.solved
    assert names.index("prepass_end") == names.index("sweep", sweeps[-1]) + 1

    size = output.stat().st_size
    after_write = _check_phase(received, "write", size)
    assert after_write == len(received)  # the write is the last phase
    assert result.output_bytes == size


def test_cli_progress_on_a_terminal_and_quiet_json(demo_pair, tmp_path, monkeypatch, capsys):
    a, b = demo_pair
    monkeypatch.chdir(tmp_path)
    for path in (a, b):
        shutil.copy(path, tmp_path)
    rc = main(["merge", "A.safetensors", "B.safetensors", "-o", "piped.safetensors", "--threads", "2"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""  # stderr is no terminal: no bars in logs and pipes
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc = main(["merge", "A.safetensors", "B.safetensors", "--threads", "2", "--iters", str(MAX_ITER)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for label in (
        "checking A and B",
        "reading A and B",
        "starting point",
        "re-basin sweep 1",
        "keys",
        "writing",
    ):
        assert label in err, label
    assert f"/{MAX_ITER} " not in err and f"/{MAX_ITER}|" not in err
    assert "wrote merged.safetensors" in out

    rc = main(
        ["merge", "A.safetensors", "B.safetensors", "-o", "q.safetensors", "--threads", "2", "-q", "--json"]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    summary = json.loads(out)  # one object, nothing else on stdout
    assert summary["output"] == "q.safetensors" and math.isfinite(summary["objective"])
    assert pathlib.Path("q.safetensors").stat().st_size == summary["output_bytes"]
