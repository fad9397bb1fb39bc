"""qsnap's benchmarks (docs/benchmarks.md)."""
import os
import subprocess
import sys


def compile_qsnap_once(cache_dir, modules):
    """Make the qsnap runs that follow start as a pip install leaves them.

    Bytecode (qsnap's, NumPy's, the interpreter's) is compiled once into the
    private ``cache_dir`` (kept out of the checkout), whatever
    PYTHONDONTWRITEBYTECODE says in this shell; without it every run compiles
    qsnap's modules again (~25 ms).  The environment is changed for this
    process and its children.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    subprocess.run([sys.executable, "-m", "qsnap", "--help"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], check=True)


def evict_file(path):
    """Write ``path`` back and drop it from the page cache (posix_fadvise DONTNEED), so
    that the next reader takes it from the disk; a file that cannot be opened is left."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
