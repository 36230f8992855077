"""cli/progress.py: tqdm bars with totals on a terminal, plain lines (no carriage return) otherwise or without tqdm;
``edgeroute bench`` and ``eval`` through it on a pipe (``edgeroute export``: tests/test_export.py::test_cli_export;
the export's own step reports: tests/test_gguf_tokenizer.py)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from edgeroute.cli import cli, progress
from edgeroute.cli.progress import Steps


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def export_like(steps: Steps) -> None:
    """The library's callback protocol as export_model drives it (edgeroute.export.steps)."""
    report = steps.callback({"quantise": "quantising int4"}, {"quantise": "weights", "validate": "texts"})
    report("load", "start", 0.0)
    report("load", "done", 0.25)
    report("quantise", "start", 0.0)
    report("quantise", "total", 5.0)
    for _ in range(5):
        report("quantise", "advance", 1.0)
    report("quantise", "someday", 1.0)  # an event it does not know: ignored
    report("quantise", "done", 12.34)
    report("validate", "start", 0.0)
    report("validate", "total", 4.0)
    report("validate", "advance", 1.0)
    report("validate", "done", 3.0)


def test_a_terminal_gets_tqdm_bars_with_totals() -> None:
    pytest.importorskip("tqdm")
    term = FakeTerminal()
    with Steps("export", term) as steps:
        assert steps.bars
        export_like(steps)
        steps.start("counting", unit="things")
        steps.advance(3)
    out = term.getvalue()
    assert "\r" in out  # redrawn in place
    finals = [line.rsplit("\r", 1)[-1] for line in out.split("\n") if line]  # what each bar shows at the end
    assert len(finals) == 4, finals
    assert finals[0].startswith("export: load [")  # no count: the elapsed time only
    assert re.match(r"export: quantising int4: 100%\|.*\| 5/5 weights \[", finals[1]), finals[1]
    assert re.match(r"export: validate:  25%\|.*\| 1/4 texts \[", finals[2]), finals[2]
    assert finals[3].startswith("export: counting: 3 things [")
    assert "export: quantising int4:   0%|" in out  # the bar started empty and filled


def test_a_pipe_gets_plain_lines() -> None:
    pipe = io.StringIO()
    with Steps("export", pipe) as steps:
        assert not steps.bars
        export_like(steps)
    assert pipe.getvalue().splitlines() == [
        "export: load ...",
        "export: load done in 0.2 s",
        "export: quantising int4 ...",
        "export: quantising int4 done in 12.3 s (5 weights)",
        "export: validate ...",
        "export: validate done in 3.0 s (1/4 texts)",
    ]


def test_plain_lines_say_where_a_long_step_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    pipe = io.StringIO()
    with Steps("eval", pipe) as steps:
        steps.start("measuring 2 settings", total=3, unit="samples")
        steps.advance()
        steps.advance()
        steps.advance()  # the last: the done line says it
    lines = pipe.getvalue().splitlines()
    assert lines[0] == "eval: measuring 2 settings (3 samples) ..."
    assert re.fullmatch(r"eval: measuring 2 settings: 1/3 samples, \d+ s", lines[1]), lines
    assert re.fullmatch(r"eval: measuring 2 settings: 2/3 samples, \d+ s", lines[2]), lines
    assert re.fullmatch(r"eval: measuring 2 settings done in \d+\.\d s \(3 samples\)", lines[3]), lines
    assert len(lines) == 4


def test_without_tqdm_a_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as in a core install: import tqdm fails
    term = FakeTerminal()
    with Steps("export", term) as steps:
        assert not steps.bars
        export_like(steps)
    assert "\r" not in term.getvalue()
    assert "export: quantising int4 done in 12.3 s (5 weights)" in term.getvalue().splitlines()


def test_a_failing_step_says_it_stopped() -> None:
    pipe = io.StringIO()
    with pytest.raises(RuntimeError), Steps("bench", pipe) as steps:
        steps.start("generating 8 tokens", total=6, unit="runs")
        steps.advance(2)
        raise RuntimeError("boom")
    assert re.fullmatch(
        r"bench: generating 8 tokens stopped after \d+\.\d s \(2/6 runs\)", pipe.getvalue().splitlines()[-1]
    )
    term = FakeTerminal()
    with pytest.raises(RuntimeError), Steps("bench", term, bars=True) as steps, steps.step("x", total=2):
        raise RuntimeError("boom")
    assert steps._bar is None and steps._label is None  # the bar was closed


@pytest.mark.export
def test_the_gguf_readers_own_bar_becomes_the_load_steps_count(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from edgeroute.export import sources
    from edgeroute.export.steps import Step
    from transformers import modeling_gguf_pytorch_utils as reader

    events: list[tuple[str, str, float]] = []
    own = reader.tqdm
    with sources._gguf_tensors_counted(Step("load", lambda *e: events.append(e))):
        assert list(reader.tqdm(["a", "b", "c"], desc="Converting and de-quantizing GGUF tensors...")) == [
            "a",
            "b",
            "c",
        ]
    assert reader.tqdm is own
    assert events == [("load", "total", 3.0)] + [("load", "advance", 1.0)] * 3
    assert "Converting" not in capfd.readouterr().err


def plain_steps(stderr: str, command: str) -> list[str]:
    assert "\r" not in stderr
    return [line for line in stderr.splitlines() if line.startswith(f"{command}: ")]


def test_bench_on_a_pipe_prints_its_steps(tiny_dir: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(tiny_dir), "--runs", "2", "--warmup", "1", "--new-tokens", "4"])
    assert res.exit_code == 0, res.output
    lines = plain_steps(res.stderr, "bench")
    assert lines[0] == "bench: generating 4 tokens (3 runs) ..."
    assert re.fullmatch(r"bench: generating 4 tokens done in \d+\.\d s \(3 runs\)", lines[1]), lines
    assert len(lines) == 2 and "decode" in res.stdout


def test_eval_on_a_pipe_prints_its_steps(tiny_dir: Path) -> None:
    args = ["eval", str(tiny_dir), "--num-prompts", "2", "--samples", "2", "--max-new-tokens", "4"]
    res = CliRunner().invoke(cli, [*args, "--sweep", "temperature=0.5,1.0", "--json"])
    assert res.exit_code == 0, res.output
    lines = plain_steps(res.stderr, "eval")
    assert lines[0] == "eval: measuring 2 settings (8 samples) ..."
    assert re.fullmatch(r"eval: measuring 2 settings done in \d+\.\d s \(8 samples\)", lines[1]), lines
    assert len(lines) == 2
