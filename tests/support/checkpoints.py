"""What tests compare of a run's checkpoints."""

import hashlib
from pathlib import Path


def checkpoint_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under checkpoints/: equal dicts mean byte-identical checkpoints."""
    root = run_dir / "checkpoints"
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
