"""Run each atheris harness for a bounded time (QSNAP_FUZZ_SECONDS, default 30).

A harness exits non-zero when anything other than a QsnapError escapes a reader
(or the C parser and its pure twin disagree); that fails the test with the
reproducer libFuzzer wrote.
"""
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SECONDS = int(os.environ.get("QSNAP_FUZZ_SECONDS", "30"))


@pytest.mark.parametrize("harness", ["fuzz_stream.py", "fuzz_image.py"])
def test_harness_runs_clean(harness, tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = [sys.executable, str(HERE / harness), f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    env = dict(os.environ, QSNAP_FUZZ_WORKDIR=str(tmp_path / "work"))
    os.environ["QSNAP_FUZZ_WORKDIR"] = env["QSNAP_FUZZ_WORKDIR"]
    try:
        import seeds

        if harness == "fuzz_stream.py":
            args.append(str(seeds.stream_corpus()))
    finally:
        del os.environ["QSNAP_FUZZ_WORKDIR"]
    args.append(str(corpus))
    r = subprocess.run(args, capture_output=True, text=True, timeout=SECONDS + 300, env=env)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-")))
    assert r.returncode == 0 and not crashes, (crashes, r.stderr[-4000:])
    assert "stat::number_of_executed_units" in r.stderr
