"""Peak memory and time of decoding each hostile image (tests/hostile.py), the current decoder
against a baseline decoder from another git revision, in the same run. Each image is decoded
in a fresh process, which reports its peak-RSS growth (ru_maxrss after − before) and the wall
time; the baseline is the decoder as it was before the fix (resize the shorter side, then crop).
Also the time of decoding ordinary photos (640×480 JPEGs), to show the fix costs nothing there.

    .venv/bin/python benchmarks/decode_memory.py --baseline 942c10a --out benchmarks/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, resource, sys, time
sys.path.insert(0, sys.argv[3])
spec = importlib.util.spec_from_file_location("decoder", sys.argv[1])
decoder = importlib.util.module_from_spec(spec); spec.loader.exec_module(decoder)
from tests.hostile import HOSTILE_IMAGES
name = sys.argv[2]
if name == "photo640.jpg":
    import io, numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data, repeat = buf.getvalue(), 50
else:
    data, repeat = HOSTILE_IMAGES[name](), 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
for _ in range(repeat):
    try:
        decoder.decode(data, 224, 256, 40_000_000); outcome = "decoded"
    except decoder.ImageError as e:
        outcome = "refused: " + e.reason[:40]
    except MemoryError:
        outcome = "MemoryError"
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, (time.perf_counter() - t0) / repeat, outcome)
"""


def probe(decoder: Path, name: str, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(decoder), name, str(ROOT)], capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"peak_mb": None, "seconds": None, "outcome": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"peak_mb": None, "seconds": None, "outcome": f"died (exit {out.returncode}): "
                                                              f"{(out.stderr.strip().splitlines() or [''])[-1][:60]}"}
    peak, seconds, outcome = out.stdout.split(maxsplit=2)
    return {"peak_mb": round(float(peak), 1), "seconds": round(float(seconds), 4), "outcome": outcome.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="942c10a", help="git revision whose tagray/features/decode.py is the baseline")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--out", default="benchmarks/results/decode_memory.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.hostile import HOSTILE_IMAGES

    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "decode_baseline.py"
        baseline.write_text(subprocess.run(["git", "show", f"{args.baseline}:tagray/features/decode.py"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout)
        current = ROOT / "tagray/features/decode.py"
        rows = []
        for name in [*HOSTILE_IMAGES, "photo640.jpg"]:
            row = {"image": name, "baseline": probe(baseline, name, args.timeout), "current": probe(current, name,
                                                                                                      args.timeout)}
            rows.append(row)
            b, c = row["baseline"], row["current"]
            print(f"{name:16s} baseline +{b['peak_mb']} MB {b['seconds']} s ({b['outcome']}) | "
                  f"current +{c['peak_mb']} MB {c['seconds']} s ({c['outcome']})", flush=True)
    result = {"machine": f"{platform.machine()}, {platform.python_version()}", "baseline": args.baseline, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
