"""Process isolation: each measurement runs in a fresh Python process (measure/job.py), so its peak RSS
is that of one model on one backend and thread pools or a CUDA context do not leak into the next."""
import json
import os
import subprocess
import sys

from clock_deploy.errors import UserError
from clock_deploy.io import write_json
from clock_deploy.measure.job import PROGRESS_PREFIX

WORK_DIR_PREFIX = "clock-deploy-bench-"  # + pid of the bench: a later bench removes those of killed ones


def run_isolated(job, work_dir, report=None):
    """Run `job` in a fresh Python process; its result dict, or UserError with the child's last error line.

    report: called with each progress text the job writes ('timed 40/100', ...) while it runs."""
    job_path = os.path.join(work_dir, "job.json")
    result_path = os.path.join(work_dir, "result.json")
    write_json(job_path, job)
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),  # OpenMP / MKL pools follow --threads too
               CLOCK_DEPLOY_BENCH_PARENT=str(os.getpid()))
    lines = []
    with subprocess.Popen([sys.executable, "-m", "clock_deploy.measure.job", job_path, result_path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as child:
        for line in child.stderr:  # read as it comes: progress now, the error line at the end
            if line.startswith(PROGRESS_PREFIX):
                if report is not None:
                    report(line[len(PROGRESS_PREFIX):].strip())
            elif line.strip():
                lines.append(line.rstrip("\n"))
    if child.returncode != 0:
        last = lines[-1] if lines else f"exit code {child.returncode}"
        raise UserError(last[len("error: "):] if last.startswith("error: ") else last)
    with open(result_path) as f:
        return json.load(f)
