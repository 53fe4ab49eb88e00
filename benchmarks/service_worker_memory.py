"""Resident memory of one service worker process by generation layer and ensemble size.

Prints ONE JSON object. Each case starts the real worker (`python -m service.worker_process`)
with the replay backend, sends its `init`, waits for `ready` (the backend and generators are
loaded) and reads its VmRSS from /proc (MiB), and whether it mapped libtorch:

- `endpoints_1`, `endpoints_5`: `generators.kind: openai` with an endpoints manifest of 1 or
  5 members (clients of model servers; nothing is contacted at start-up);
- `in_process_1`: `generators.kind: model` with the tiny Qwen2 model (`tiny-qwen2`, built
  in-process) — what every worker held before (torch and the model).

The tiny model is a few MB; a 1.5B checkpoint adds ~3 GB (bf16) per member per worker to the
in-process rows, and nothing to the endpoints rows.

Usage: python benchmarks/service_worker_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker_rss(config: dict) -> dict:
    from service.config import ServiceConfig

    validated = ServiceConfig.model_validate(config)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "service.worker_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"op": "init", "config": validated.model_dump(mode="json"), "backend": "replay"}) + "\n")
        proc.stdin.flush()
        ready = json.loads(proc.stdout.readline())
        if ready.get("event") != "ready":
            raise RuntimeError(f"worker did not start: {ready}")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        return {"rss_mib": round(rss_kib / 1024, 1), "members": len(ready["generators"]),
                "libtorch_mapped": "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        from training.modeling import TINY_MODEL, load_tokenizer

        load_tokenizer(TINY_MODEL).save_pretrained(Path(tmp) / "tokenizer")  # each member's checkpoint: its tokenizer files

        def manifest(n: int) -> str:
            path = Path(tmp) / f"endpoints{n}.json"
            members = [{"name": f"m{i}", "base_url": "http://127.0.0.1:9", "model": f"m{i}", "checkpoint": str(Path(tmp) / "tokenizer")}
                       for i in range(n)]
            path.write_text(json.dumps({"version": 1, "members": members}))
            return str(path)

        base = {"data_dir": tmp, "workers": {"count": 1}}
        cases = {
            "endpoints_1": {**base, "backend": {"kind": "replay", "generators": {"kind": "openai", "endpoints": manifest(1)}}},
            "endpoints_5": {**base, "backend": {"kind": "replay", "generators": {"kind": "openai", "endpoints": manifest(5)}}},
            "in_process_1": {**base, "backend": {"kind": "replay", "generators": {"kind": "model", "models": ["tiny-qwen2"], "device": "cpu"}}},
        }
        out = {name: worker_rss(config) for name, config in cases.items()}
    out["endpoints_growth_mib_per_member"] = round((out["endpoints_5"]["rss_mib"] - out["endpoints_1"]["rss_mib"]) / 4, 2)
    out["in_process_over_endpoints_mib"] = round(out["in_process_1"]["rss_mib"] - out["endpoints_1"]["rss_mib"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
