"""Wall time and peak memory of every stage of ``jobs/pipeline.py`` (the job's whole process tree, Ray included).

    python benchmarks/pipeline_memory.py --out stages.json -- --config jobs/configs/tiny.yaml run_dir=/tmp/tiny

Everything after ``--`` goes to ``jobs/pipeline.py``. The tree's RSS (driver + Ray processes; shared pages counted
once per process, so an upper bound) is sampled every 0.5 s and attributed to the stage the pipeline last announced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_scale import _tree_rss  # noqa: E402

STAGE_LINE = re.compile(r"\[pipeline\] (\S+): (running|done in ([0-9.]+)s|skipped)")


def main(argv: list[str] | None = None) -> int:
    import psutil

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--log", help="pipeline output (default: OUT with .log)")
    p.add_argument("pipeline_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    log = Path(args.log or Path(args.out).with_suffix(".log"))
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), *[a for a in args.pipeline_args if a != "--"]]
    env = dict(os.environ)
    stages: dict[str, dict] = {}
    current = None
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            for m in STAGE_LINE.finditer(log.read_text(errors="replace")):
                name, what, secs = m.groups()
                st = stages.setdefault(name, {"peak_rss_gb": 0.0})
                if what == "running":
                    current = name
                elif secs:
                    st["wall_s"] = float(secs)
                else:
                    st["skipped"] = True
            if current:
                _, tree, _ = _tree_rss(ps)
                stages[current]["peak_rss_gb"] = round(max(stages[current]["peak_rss_gb"], tree / 2**30), 3)
            time.sleep(0.5)
    for m in STAGE_LINE.finditer(log.read_text(errors="replace")):
        name, what, secs = m.groups()
        if secs:
            stages.setdefault(name, {"peak_rss_gb": 0.0})["wall_s"] = float(secs)
    out = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": round(time.time() - t0, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stages": stages}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
