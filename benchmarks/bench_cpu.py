"""Original vs pruned SSD on ONNX Runtime CPU (and PyTorch eager CPU), batch 1 and 8.

The checkpoints come from the pruning benchmark (``benchmarks/results/prune_synth*.json`` names
them) unless given with ``--original`` / ``--pruned``. Results go to
``benchmarks/results/bench_cpu/`` (``bench.json``, ``REPORT.md``, plots); the report names the
device they were measured on.

    python benchmarks/bench_cpu.py [--original A.pt --pruned B.pt] [--data synth] [--min-time 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ORIGINAL_HINTS = ("original", "baseline", "base", "dense", "unpruned", "trained", "start", "input")
PRUNED_HINTS = ("pruned", "final", "retrained", "compressed", "output")

log = logging.getLogger("bench_cpu")


def _checkpoints(obj: Any, key: str = "") -> list[tuple[str, str]]:
    """Every (key path, value) whose value is an existing ``.pt`` file, anywhere in a JSON tree."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _checkpoints(v, f"{key}.{k}".lower())
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _checkpoints(v, f"{key}[{i}]")
    elif isinstance(obj, str) and obj.endswith((".pt", ".pth")):
        p = Path(obj) if Path(obj).is_absolute() else (ROOT.parent / obj)
        if p.is_file():
            out.append((key, str(p)))
    return out


def find_prune_checkpoints(results: Path = RESULTS) -> tuple[str | None, str | None, dict[str, Any]]:
    """(original, pruned, the JSON they came from) from the newest ``prune_synth*.json``."""
    files = sorted(results.glob("prune_synth*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            continue
        found = _checkpoints(data)
        orig = next((p for k, p in found if any(h in k for h in ORIGINAL_HINTS) and "prun" not in k), None)
        pruned = next(
            (p for k, p in reversed(found) if any(h in k for h in PRUNED_HINTS) and p != orig), None
        )
        if orig and pruned:
            log.info("checkpoints from %s: original %s, pruned %s", f, orig, pruned)
            return orig, pruned, {"source": str(f), **({"data": data["data"]} if "data" in data else {})}
    return None, None, {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", help="original checkpoint (default: from prune_synth*.json)")
    ap.add_argument("--pruned", help="pruned checkpoint (default: from prune_synth*.json)")
    ap.add_argument(
        "--data", default=None, help="dataset spec for accuracy (default: the pruning run's, else synth)"
    )
    ap.add_argument("--max-images", type=int, default=50)
    ap.add_argument("--backends", default="ort-cpu,torch")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--min-iters", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--max-time", type=float, default=300.0)
    ap.add_argument("--out", default=str(RESULTS / "bench_cpu"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    orig, pruned, src = find_prune_checkpoints()
    orig, pruned = args.original or orig, args.pruned or pruned
    if not orig or not pruned:
        print(
            "bench_cpu: no original/pruned checkpoints: run the pruning benchmark first "
            "(it writes benchmarks/results/prune_synth*.json) or pass --original and --pruned",
            file=sys.stderr,
        )
        return 2
    data = args.data or (src.get("data") if isinstance(src.get("data"), str) else None) or "synth"

    from prunekit.bench import TimingConfig, run_benchmark
    from prunekit.bench.report import terminal_tables

    res = run_benchmark(
        {"original": orig, "pruned": pruned},
        backends=[b for b in args.backends.split(",") if b],
        batch_sizes=[int(b) for b in args.batch.split(",")],
        data_spec=data,
        out_dir=args.out,
        timing=TimingConfig(
            warmup_iters=5, min_iters=args.min_iters, min_time_s=args.min_time, max_time_s=args.max_time
        ),
        max_images=args.max_images,
        progress=sys.stderr.isatty(),
    )
    print(terminal_tables(res))
    print(f"device: {res['machine']['device']}; wrote {Path(args.out) / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
