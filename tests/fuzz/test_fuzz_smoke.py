"""Run each atheris harness for a bounded time.

A harness exits non-zero when anything other than a QsnapError escapes a reader
or an engine (or the C parser and its pure twin disagree, or an engine leaves
files behind); that fails the test with the reproducer libFuzzer wrote.

Seconds per harness: HARNESS_SECONDS, or QSNAP_FUZZ_SECONDS for each of them;
the defaults keep the whole directory around 90 s on two cores.  The engine
harnesses run with QSNAP_FUZZ_ALLOW_KNOWN=1: findings listed in
engine_harness.KNOWN (fixed by another change, kept as xfail regression cases in
test_fuzz_regressions.py) are counted; anything else fails here.
"""
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
HARNESS_SECONDS = {"fuzz_stream.py": 10, "fuzz_image.py": 10, "fuzz_save.py": 10, "fuzz_load.py": 7,
                   "fuzz_postcopy.py": 10}
ENGINES = ("fuzz_save.py", "fuzz_load.py", "fuzz_postcopy.py")


def _seconds(harness):
    return int(os.environ.get("QSNAP_FUZZ_SECONDS", HARNESS_SECONDS[harness]))


@pytest.mark.parametrize("harness", list(HARNESS_SECONDS))
def test_harness_runs_clean(harness, tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    seconds = _seconds(harness)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = [sys.executable, str(HERE / harness), f"-max_total_time={seconds}",
            f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    env = dict(os.environ, QSNAP_FUZZ_WORKDIR=str(tmp_path / "work"))
    env.pop("QSNAP_FUZZ_FINDINGS", None)
    if harness in ENGINES:
        env["QSNAP_FUZZ_ALLOW_KNOWN"] = "1"
    os.environ["QSNAP_FUZZ_WORKDIR"] = env["QSNAP_FUZZ_WORKDIR"]
    try:
        import seeds

        if harness == "fuzz_stream.py":
            args.append(str(seeds.stream_corpus()))
    finally:
        del os.environ["QSNAP_FUZZ_WORKDIR"]
    args.append(str(corpus))
    r = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 300, env=env)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-")))
    assert r.returncode == 0 and not crashes, (crashes, r.stderr[-4000:])
    assert "stat::number_of_executed_units" in r.stderr
    executed = int(r.stderr.split("stat::number_of_executed_units:")[1].split()[0])
    assert executed > 10, r.stderr[-2000:]
