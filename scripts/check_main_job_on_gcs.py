"""The README main job (`matlm train && matlm eval --max_examples=20`) on a gs:// model dir
and on a local dir, side by side, against fake-gcs-server on loopback (tests/gcs_emulator.py,
the `test` extra): the losses in metrics.jsonl and the eval results must be identical.

    python scripts/check_main_job_on_gcs.py [--local_dir=/tmp/main_job_local]

About 8 minutes on the 2-core CPU (both jobs at once). Exit 0 when everything matches.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import gcs_emulator  # noqa: E402

MAIN_JOB = "matlm train --model_dir={d} --no_progress && " \
           "matlm eval --model_dir={d} --max_examples=20 --no_progress"


def losses(model_dir) -> list:
    return [{k: v for k, v in json.loads(line).items() if "loss" in k or k == "step"}
            for line in model_dir.metrics_file.read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_dir", default="/tmp/main_job_local")
    args = parser.parse_args()
    shutil.rmtree(args.local_dir, ignore_errors=True)
    with gcs_emulator.emulator() as server:
        gcs_emulator.point_clients_at(server)
        bucket = f"matlm-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        url = f"gs://{bucket}/runs/default"
        start = time.time()
        jobs = {where: subprocess.Popen(["bash", "-c", MAIN_JOB.format(d=where)], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                for where in (url, args.local_dir)}
        for where, job in jobs.items():
            output = job.communicate()[0]
            print(f"{where}: exit {job.returncode} after {time.time() - start:.0f} s")
            if job.returncode != 0:
                print(output[-3000:])
                return 1
        from matlm.model_dir import ModelDir
        on_bucket, local = ModelDir(url), ModelDir(args.local_dir)
        step = on_bucket.checkpoint_steps()[-1]
        results = [json.loads((d.eval_dir(step) / "results.json").read_text())["tasks"]
                   for d in (on_bucket, local)]
        checks = {
            f"losses in metrics.jsonl ({len(losses(local))} rows)":
                losses(on_bucket) == losses(local),
            f"checkpoints {on_bucket.checkpoint_steps()}":
                on_bucket.checkpoint_steps() == local.checkpoint_steps(),
            f"eval results ({len(results[1])} tasks)": results[0] == results[1],
            "eval files on the bucket": sorted(p.name for p in on_bucket.eval_dir(step).iterdir())
                == sorted(p.name for p in local.eval_dir(step).iterdir()),
        }
    for name, ok in checks.items():
        print(f"{'same' if ok else 'DIFFERENT'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
