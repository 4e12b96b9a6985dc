"""What every study shares: where a run was trained, which record is a run, and how paired runs are read.

- Machine: a run record names the CPU model, torch's CPU capability (the kernel set: AVX512, AVX2, ...) and
  the thread count of every machine that trained part of it; a run resumed elsewhere lists each part.
  Runs pair only within one machine type (CPU model + capability): the same seed trained on another CPU
  ends elsewhere.
- Run registry: one json per finished run. A run is keyed on its config minus the keys at their defaults
  (so adding a config key at its default keeps every key), on what else it reads (a teacher), and on the
  code it depends on. Each record also keeps its whole resolved config, so a changed default is noticed: a
  training run trains it again, a report reads it as recorded and names the default it was trained under.
- Paired statistics: mean, sd, 95% t interval, two-sided paired t-test, Holm's correction.
- Report rendering: markdown tables and the few number formats the reports share.
"""
import collections
import functools
import glob
import hashlib
import json
import logging
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


class _EachMessageOnce(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


def log_each_message_once(logger_name):
    """Let the named logger print each distinct message once in this process (a study loads one config per run)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _EachMessageOnce) for f in logger.filters):
        logger.addFilter(_EachMessageOnce())


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

    def find(self, name, cfg, inputs, folders, as_recorded=False):
        """(record, why): the record of `name` if it is a run of `cfg` with `inputs` under the code and defaults
        now; with as_recorded (reports) also one trained under older code or older defaults, read as recorded
        (`as_recorded_lines` names them); else (None, why)."""
        path = self.path(name)
        if not os.path.isfile(path):
            return None, "not run"
        try:
            record = read_json(path)
            recorded_code = record["code"]["hash"]
            recorded_config = record["config"]
            recorded_settings = record["settings"]
            key = record["key"]
        except (UserError, KeyError, TypeError) as e:
            return None, f"{path}: not a run record ({e})"
        now = resolved_settings(cfg, self.ignored)
        settings = explicit_settings(cfg, self.ignored)
        changed = changed_defaults(recorded_config, now)
        if not changed and key == run_key(settings, inputs, code_hash(tuple(folders))):
            return record, "current"
        if (as_recorded and key == run_key(recorded_settings, record.get("inputs"), recorded_code)
                and record.get("inputs") == inputs and same_run_but_defaults(record, now, settings)):
            return record, "as recorded"
        if changed:
            return None, f"{path}: trained with other values of {', '.join(changed)}"
        return None, f"{path}: config, inputs or code changed since it ran"


def changed_defaults(recorded, now):
    """The keys present both in a record's config and in the config now whose values differ (a default
    changed since the run, or a setting): a key only one side has was added or removed at its default."""
    return sorted(k for k in recorded.keys() & now.keys() if recorded[k] != now[k])


def same_run_but_defaults(record, now, settings):
    """Whether a record is the run of a config (resolved `now`, explicit `settings`) up to changed defaults:
    every key either run set away from its default has one value in both, and a key whose value differs was
    at its default in both (the default moved between them)."""
    recorded_settings = record["settings"]
    for k in sorted(record["config"].keys() & now.keys()):
        if record["config"][k] != now[k] and (k in recorded_settings or k in settings):
            return False
    return all(k in now for k in recorded_settings) and all(k in record["config"] for k in settings)


def older_defaults(record, defaults):
    """{key: value} of the defaults a record was trained under that differ from `defaults` (resolved_settings of
    Config() now)."""
    return {k: v for k, v in record["config"].items()
            if k not in record["settings"] and k in defaults and defaults[k] != v}


def as_recorded_lines(records, current_code):
    """A report's lines naming the older code and the older defaults some of the records it reads were
    trained under ([] when none)."""
    lines = []
    older = sorted({r["code"]["hash"] for r in records} - set(current_code))
    if older:
        lines.append(f"Run files read as recorded, written by older code (code hash {', '.join(older)}; each file "
                     f"names its commit). A training run would train them again.")
    defaults = resolved_settings(Config(), ())
    moved = collections.Counter(f"{k}={v!r}" for r in records for k, v in older_defaults(r, defaults).items())
    for setting, count in sorted(moved.items()):
        lines.append(f"{count} of the run files read as recorded were trained when the default was {setting} (it "
                     f"has changed since; each file holds its whole config). A training run would train them again.")
    return lines + [""] if lines else []


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
