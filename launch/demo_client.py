"""The demo's client during the update rounds: POST /predict continuously until STOP_FILE appears, then print
how many answers of each HTTP status it got and which model versions served them (from /metadata).

    python launch/demo_client.py http://127.0.0.1:8000 clip.webm STOP_FILE
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import requests


def main(base: str, clip: Path, stop: Path) -> int:
    body = clip.read_bytes()
    status: Counter[int] = Counter()
    versions: list[str] = []  # in the order they were first seen
    while not stop.exists():
        try:
            status[requests.post(f"{base}/predict?top_k=1", data=body, timeout=60).status_code] += 1
            version = str(requests.get(f"{base}/metadata", timeout=10).json()["model"]["version"])
        except requests.RequestException as e:  # a refused connection is a failed request too
            status[0] += 1
            print(f"[client] request failed: {e}", flush=True)
            continue
        if not versions or versions[-1] != version:
            versions.append(version)
        time.sleep(0.2)  # a steady stream, leaving the 2 cores to the round
    ok, total = status[200], sum(status.values())
    answers = ", ".join(f"{k or 'no answer'}: {v}" for k, v in sorted(status.items()))
    print(f"[client] {total} requests while the rounds ran ({answers}); non-200: {total - ok}; "
          f"served versions in order: {' -> '.join(versions)}")  # fmt: skip
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
