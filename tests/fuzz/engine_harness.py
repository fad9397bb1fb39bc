"""What the engine harnesses (fuzz_save, fuzz_load, fuzz_postcopy) share.

The contract: an engine call either succeeds or raises a QsnapError with a
one-line message; any other exception, a hang (libFuzzer's -timeout), a crash,
a leftover temporary file or a file at the image path after a failure is a
finding.

A finding normally ends the run (libFuzzer writes the reproducer).  With
QSNAP_FUZZ_FINDINGS=DIR a long campaign keeps going instead: the smallest
input per signature (exception type, message shape, innermost qsnap frame) is
kept in DIR and the run continues.  KNOWN lists signatures (regular expressions)
of findings whose fix belongs to another change; with QSNAP_FUZZ_ALLOW_KNOWN=1
(the smoke test) they are counted, not fatal.
"""
import hashlib
import os
import pathlib
import re
import shutil
import sys
import traceback

import seeds

REPO = seeds.REPO
FINDINGS = os.environ.get("QSNAP_FUZZ_FINDINGS")
ALLOW_KNOWN = os.environ.get("QSNAP_FUZZ_ALLOW_KNOWN") == "1"

# Signatures (regular expressions on signature()) of findings fixed elsewhere.
KNOWN = ()


class ContractViolation(AssertionError):
    """An engine broke the contract without raising (files left behind, bad output)."""


def work_dir(harness):
    """A fresh per-process directory on tmpfs when there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else seeds.cache_dir()
    # libFuzzer ends the process without Python's cleanup: remove what dead runs left
    for old in pathlib.Path(base).glob(f"qsnap-{harness}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(old, ignore_errors=True)
    d = pathlib.Path(base) / f"qsnap-{harness}-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def check_message(e):
    msg = str(e)
    if not msg or "\n" in msg:
        raise ContractViolation(f"bad error message {msg!r} from {type(e).__name__}")


def signature(exc):
    """Type, message shape (numbers masked) and innermost qsnap frame of ``exc``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/qsnap/" in f.filename]
    where = f"{pathlib.Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
    shape = re.sub(r"0x[0-9a-f]+|\d+", "N", str(exc).splitlines()[0] if str(exc) else "")[:80]
    return f"{type(exc).__name__}|{where}|{shape}"


def is_known(sig):
    return any(re.search(k, sig) for k in KNOWN)


_seen = {}


def finding(exc, data, extra=b""):
    """Handle a contract violation: raise it, or record it and go on (see module doc)."""
    sig = signature(exc)
    if ALLOW_KNOWN and is_known(sig):
        _seen[sig] = _seen.get(sig, 0) + 1
        return
    if not FINDINGS:
        raise exc
    d = pathlib.Path(FINDINGS)
    d.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(sig.encode()).hexdigest()[:12]
    path = d / f"{key}.bin"
    if key not in _seen:
        (d / f"{key}.txt").write_text(sig + "\n\n" + "".join(traceback.format_exception(exc)))
        sys.stderr.write(f"\nFINDING {key}: {sig}\n")
    _seen[key] = _seen.get(key, 0) + 1
    if not path.exists() or path.stat().st_size > len(data):
        path.write_bytes(bytes(data))


def check_no_leftovers(directory, expected, where="beside the image"):
    """ContractViolation when ``directory`` holds names other than ``expected``
    (temporary files, stray images)."""
    extra = sorted(set(os.listdir(directory)) - set(expected))
    if extra:
        raise ContractViolation(f"files left {where}: {extra}")


def write_seed_dir(name, items):
    """A seed corpus directory holding ``items`` [(name, bytes)], rewritten each start."""
    d = seeds.cache_dir() / f"seeds-{name}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for n, b in items:
        (d / n).write_bytes(b)
    return d


def run(argv, harness, test_one_input, seed_dir, custom_mutator=None, max_len=1 << 18, timeout=10):
    """libFuzzer main: the caller's corpus directories (or a cached one) then the seeds."""
    import atheris

    argv = list(argv)
    seeds.limit_memory()
    if not any(not a.startswith("-") for a in argv[1:]):
        d = seeds.cache_dir() / f"corpus-{harness}"
        d.mkdir(parents=True, exist_ok=True)
        argv.append(str(d))
    if not any(a.startswith("-merge=") for a in argv) and not any(os.path.isfile(a) for a in argv[1:]):
        argv.append(str(seed_dir()))
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append(f"-max_len={max_len}")
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append(f"-timeout={timeout}")
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
