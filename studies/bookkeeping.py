"""What every study shares: where a run was trained, which record is a run, and how paired runs are read.

- Machine: a run record names the CPU model, torch's CPU capability (the kernel set: AVX512, AVX2, ...) and
  the thread count of every machine that trained part of it; a run resumed elsewhere lists each part.
  Runs pair only within one machine type (CPU model + capability): the same seed trained on another CPU
  ends elsewhere.
- Run registry: one json per finished run. A run is keyed on its config minus the keys at their defaults
  (so adding a config key at its default keeps every key), on what else it reads (a teacher), and on the
  code it depends on. Each record also keeps its whole resolved config, so a changed default is noticed.
- Paired statistics: mean, sd, 95% t interval, two-sided paired t-test, Holm's correction.
- Report rendering: markdown tables and the few number formats the reports share.
"""
import functools
import glob
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess

import torch

from clock_deploy.config import Config, to_dict
from clock_deploy.errors import UserError
from clock_deploy.io import read_json, write_json, write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- machine

def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    """This process's machine as a run records it."""
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def machine_type(record):
    """"<CPU model> / <capability>" of the machine that trained every part of the run; runs of two machine
    types never pair. A run whose parts ran on different types is "mixed: A + B" (pairs with nothing)."""
    types = list(dict.fromkeys(f"{m['cpu']} / {m['capability']}" for m in record["parts"]))
    return types[0] if len(types) == 1 else "mixed: " + " + ".join(types)


PARTS_FILE = "machines.json"  # in a run's folder: the machine of each part trained so far


def start_part(run_dir, resuming):
    """Note in run_dir that this machine trains the next part; returns every part's machine so far. A run
    that starts afresh (nothing to resume) forgets the parts of an earlier start."""
    path = os.path.join(run_dir, PARTS_FILE)
    parts = read_json(path) if resuming and os.path.isfile(path) else []
    parts.append(machine())
    write_json(path, parts)
    return parts


# ---------------------------------------------------------------- run keys

# Where a run is written and placed, not what it computes; a teacher is keyed by what it is (a study passes
# the teacher's own key in `inputs`), not by where its file lies on one machine.
IGNORED_KEYS = ("output_dir", "device", "distill.teacher")


def flatten(data, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolved_settings(cfg, ignored=IGNORED_KEYS):
    """Every config key of a run (dotted) and its value, less the `ignored` keys."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in ignored}


def explicit_settings(cfg, ignored=IGNORED_KEYS):
    """The keys a run sets away from their defaults: what its key is computed from. A key added to the
    schema later, at its default, is not among them, so it leaves every recorded key as it was."""
    defaults = resolved_settings(Config(), ignored)
    return {k: v for k, v in resolved_settings(cfg, ignored).items() if k not in defaults or defaults[k] != v}


@functools.lru_cache(maxsize=None)
def code_hash(folders):
    """Fingerprint of clock_deploy/<folder>/*.py for `folders` (a tuple). Read once per process: the modules
    it runs were imported at start, so an edit made while a study runs is not recorded as its code."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(glob.glob(os.path.join("clock_deploy", folder, "**", "*.py"), root_dir=REPO,
                                     recursive=True)):
            digest.update(path.encode())
            with open(os.path.join(REPO, path), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def run_key(settings, inputs, code):
    """Hash of what decides a run's result: its explicit settings, what else it reads (`inputs`, e.g. a
    teacher's key) and the hash of the code it depends on."""
    text = json.dumps({"settings": settings, "inputs": inputs, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def commit():
    """The git commit this process runs (read once, like code_hash)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- run registry

class RunRegistry:
    """The finished runs of a study: <folder>/<name>.json, each a record written by `record()`. `locations`:
    config keys that only say where an input lies on this machine (e.g. data.root); they are left out of the
    key, and the study passes what the input is in `inputs` instead."""

    def __init__(self, folder, locations=()):
        self.folder = folder
        self.ignored = IGNORED_KEYS + tuple(locations)

    def path(self, name):
        return os.path.join(self.folder, f"{name}.json")

    def record(self, name, cfg, inputs, folders, **fields):
        """Write the record of a finished run of `cfg`, keyed as `find` looks it up; returns it."""
        folders = tuple(folders)
        record = {"name": name, **fields,
                  "key": run_key(explicit_settings(cfg, self.ignored), inputs, code_hash(folders)),
                  "settings": explicit_settings(cfg, self.ignored), "config": resolved_settings(cfg, self.ignored),
                  "inputs": inputs,
                  "code": {"hash": code_hash(folders), "folders": list(folders), "commit": commit()}}
        write_json(self.path(name), record)
        return record

    def find(self, name, cfg, inputs, folders, older_code=False):
        """(record, why): the record of `name` if it is a run of `cfg` with `inputs` under the code now, or
        with older_code also under the code recorded in it (reports read it as recorded); else (None, why)."""
        path = self.path(name)
        if not os.path.isfile(path):
            return None, "not run"
        try:
            record = read_json(path)
            recorded_code = record["code"]["hash"]
            recorded_config = record["config"]
            key = record["key"]
        except (UserError, KeyError, TypeError) as e:
            return None, f"{path}: not a run record ({e})"
        changed = changed_defaults(recorded_config, resolved_settings(cfg, self.ignored))
        if changed:
            return None, f"{path}: trained with other values of {', '.join(changed)}"
        settings = explicit_settings(cfg, self.ignored)
        if key == run_key(settings, inputs, code_hash(tuple(folders))):
            return record, "current"
        if older_code and key == run_key(settings, inputs, recorded_code):
            return record, "older code"
        return None, f"{path}: config, inputs or code changed since it ran"


def changed_defaults(recorded, now):
    """The keys present both in a record's config and in the config now whose values differ (a default
    changed since the run, or a setting): a key only one side has was added or removed at its default."""
    return sorted(k for k in recorded.keys() & now.keys() if recorded[k] != now[k])


def older_code_line(records, current):
    """A report's line naming older code that wrote some of the records it reads ([] when none)."""
    older = sorted({r["code"]["hash"] for r in records} - set(current))
    if not older:
        return []
    return [f"Run files read as recorded, written by older code (code hash {', '.join(older)}; each file names "
            f"its commit). A training run would train them again.", ""]


# ---------------------------------------------------------------- paired statistics

def paired_stats(deltas):
    """n, mean, sd, 95% t interval (n - 1 degrees of freedom) and two-sided paired t-test p of per-seed deltas."""
    from scipy import stats  # scipy is slow to import and only the statistics need it
    n = len(deltas)
    mean = statistics.mean(deltas)
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "ci": (math.nan, math.nan), "p": math.nan}
    sd = statistics.stdev(deltas)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(deltas, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "ci": (mean - half, mean + half), "p": p}


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values, in the order given (nan stays nan and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = list(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_delta(reference, variant):
    """paired_stats of variant minus reference ({seed: value} each) on the seeds both have; None if none."""
    seeds = sorted(reference.keys() & variant.keys())
    return paired_stats([variant[s] - reference[s] for s in seeds]) if seeds else None


# ---------------------------------------------------------------- report rendering

def p_text(p):
    """A p-value as reports print it ("-" where there is none)."""
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def mean_sd_text(values, fmt):
    """"mean +- sd" of `values` in format `fmt` (just the mean for one value)."""
    text = fmt.format(statistics.mean(values))
    return text + (f" +- {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")


def delta_cells(st, fmt):
    """[mean +- sd, 95% CI, p] cells of a paired_stats result ("" cells when there is none)."""
    if st is None:
        return ["", "", ""]
    if st["n"] < 2:  # one pair: a difference, no spread
        return [fmt.format(st["mean"]), "-", "-"]
    return [f"{fmt.format(st['mean'])} +- {fmt.format(st['sd'])}",
            f"[{fmt.format(st['ci'][0])}, {fmt.format(st['ci'][1])}]", p_text(st["p"])]


def markdown_table(header, rows):
    """A markdown table: header cells, then one list of cells per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_report(path, title, lines, command):
    """Write a study's report: its title, what wrote it, its lines and the command it comes from."""
    write_text(path, "\n".join([f"# {title}", "", *lines, "", f"Command: `{command}`", ""]))
