"""Process isolation: each measurement runs in a fresh Python process (measure/job.py), so its peak RSS
is that of one model on one backend and thread pools or a CUDA context do not leak into the next."""
import json
import os
import subprocess
import sys

from clock_deploy.errors import UserError
from clock_deploy.io import write_json

WORK_DIR_PREFIX = "clock-deploy-bench-"  # + pid of the bench: a later bench removes those of killed ones


def run_isolated(job, work_dir):
    """Run `job` in a fresh Python process; its result dict, or UserError with the child's last error line."""
    job_path = os.path.join(work_dir, "job.json")
    result_path = os.path.join(work_dir, "result.json")
    write_json(job_path, job)
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),  # OpenMP / MKL pools follow --threads too
               CLOCK_DEPLOY_BENCH_PARENT=str(os.getpid()))
    done = subprocess.run([sys.executable, "-m", "clock_deploy.measure.job", job_path, result_path],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise UserError(last[len("error: "):] if last.startswith("error: ") else last)
    with open(result_path) as f:
        return json.load(f)
