"""queue/ is a namespace folder: with the repo root on sys.path, `import queue` is still stdlib."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_repo_has_no_queue_init() -> None:
    assert not (REPO / "queue" / "__init__.py").exists()


def test_stdlib_queue_wins_with_repo_root_first_on_path() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import queue; "
        "print(queue.__file__); q = queue.Queue(); q.put(1); print(q.get())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(out[0]).resolve().parent == stdlib
    assert out[1] == "1"


def test_dashrl_queue_is_ours() -> None:
    import dashrl.queue.buffer as b

    assert Path(b.__file__).resolve().parent == REPO / "queue"
