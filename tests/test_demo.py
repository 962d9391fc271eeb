"""The README's main command on the random tiny model (no download): the embedded default answers."""

from __future__ import annotations

import re
import subprocess
import sys

from hexgen_zmq.operations.demo import embedded_layout


def test_embedded_layout_is_two_pipelines_of_different_shapes():
    for layers in (8, 30):
        pipelines = embedded_layout(layers)
        assert len(pipelines) == 2 and len({len(p) for p in pipelines}) == 2
        for stages in pipelines:  # each covers every layer, in order, without gaps
            assert stages[0][0] == 0 and stages[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
        split = next(p for p in pipelines if len(p) > 1)
        assert len({end - start for start, end in split}) > 1  # uneven


def test_demo_on_the_tiny_model_answers_and_stops(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "demo", "--model", "tiny", "--model-dir",
                             str(tmp_path / "tiny"), "--question", "Hello there", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "> Hello there" in result.stdout
    assert "pipeline p0" in result.stderr and "pipeline p1" in result.stderr
    assert re.search(r"\[[1-8] tokens, first after", result.stderr)  # print_stream's summary of the answer
