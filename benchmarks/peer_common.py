"""What the peer runners share. Plain standard library: it is imported from the peers' own environments
(vLLM's venv has no nanoserve), found beside them because Python puts a script's folder on its path."""

from __future__ import annotations


def peak_rss_bytes(pid: int | str = "self") -> int:
    """VmHWM of a process (peak resident set since its exec); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
