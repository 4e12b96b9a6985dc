"""Device profiles: what the benchmark ran on, written at the top of every report.

Latency numbers mean little without the machine state behind them: CPU
threads, GPU clocks, and on a Jetson the power mode and whether
`jetson_clocks` pinned the clocks (unpinned clocks scale with load, so
latency drifts between runs). Every fact is read through a `System`, which
maps paths onto a root folder and runs commands through a replaceable
function, so tests describe a Jetson with fixture files and canned output.
"""
import glob
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from clock_deploy.errors import UserError
from clock_deploy.naming import API, option

DEVICES = ("cpu", "cuda", "jetson-orin")

# ARM core names by `CPU part` in /proc/cpuinfo (ARM cpuinfo has no "model name")
ARM_PARTS = {"0xd42": "ARM Cortex-A78AE", "0xd07": "ARM Cortex-A57", "0xd08": "ARM Cortex-A72"}

# devfreq folder names of the integrated GPU on Jetson modules (Orin: ga10b; JetPack 6 calls it gpu)
JETSON_GPU_DEVFREQ = ("gpu", "ga10b", "gv11b", "gp10b")

LOCK_HINT = "run `sudo nvpmodel -m 0 && sudo jetson_clocks` before benchmarking"


def run_command(args, timeout=10):
    """stdout of a command (argument list, no shell), or None when it is missing or fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def torch_cuda_device():
    """Name / memory / compute capability of the first CUDA device PyTorch sees, or None."""
    import torch  # memory: torch only where a torch row or a CUDA query needs it

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_mb": props.total_memory // 2**20,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


class System:
    """Files under `root`, commands through `run`, the CUDA device through `cuda_device`.

    usable_cpus caps the default thread count (the CPUs this process may run on).
    """

    def __init__(self, root="/", run=run_command, cuda_device=torch_cuda_device, usable_cpus=None):
        self.root = root
        self.run = run
        self.cuda_device = cuda_device
        self.usable_cpus = usable_cpus

    @classmethod
    def local(cls):
        return cls(usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)

    def path(self, rel):
        return os.path.join(self.root, rel)

    def read(self, rel):
        try:
            with open(self.path(rel), errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def read_int(self, rel):
        text = self.read(rel)
        try:
            return int(text.strip()) if text else None
        except ValueError:
            return None

    def exists(self, rel):
        return os.path.exists(self.path(rel))

    def glob(self, pattern):
        """Paths relative to root matching `pattern`, sorted."""
        return sorted(os.path.relpath(p, self.root) for p in glob.glob(self.path(pattern)))


@dataclass
class DeviceProfile:
    kind: str                      # cpu | cuda | jetson-orin
    name: str                      # CPU model, GPU name or Jetson module
    threads: int                   # CPU threads for torch and onnxruntime
    threads_source: str            # "--threads" or "physical cores"
    cuda: bool                     # PyTorch can use a CUDA GPU here
    facts: dict = field(default_factory=dict)     # label -> value, shown in the report header
    warnings: list = field(default_factory=list)
    clocks_locked: Optional[bool] = None          # Jetson: clocks pinned by jetson_clocks (None = unknown)
    dla_cores: int = 0

    @property
    def torch_device(self):
        return "cuda" if self.cuda and self.kind != "cpu" else "cpu"

    def header(self):
        """(label, value) rows for report headers."""
        rows = [("device", self.kind), ("name", self.name),
                ("threads", f"{self.threads} ({self.threads_source})")]
        return rows + [(k, str(v)) for k, v in self.facts.items()]


# ---------------------------------------------------------------- CPU

def _cpuinfo_blocks(system):
    text = system.read("proc/cpuinfo") or ""
    blocks = []
    for chunk in text.strip().split("\n\n"):
        info = {}
        for line in chunk.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                info[key.strip()] = value.strip()
        if info:
            blocks.append(info)
    return blocks


def cpu_model(system):
    blocks = _cpuinfo_blocks(system)
    for info in blocks:
        if info.get("model name"):
            return info["model name"]
    for info in blocks:
        if info.get("CPU part") in ARM_PARTS:
            return ARM_PARTS[info["CPU part"]]
    return platform.processor() or platform.machine() or "unknown CPU"


def physical_cores(system):
    """Distinct (socket, core) pairs; ARM cpuinfo has neither, there every processor is a core."""
    blocks = [b for b in _cpuinfo_blocks(system) if "processor" in b]
    cores = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
    count = len(cores) or len(blocks) or os.cpu_count() or 1
    if system.usable_cpus:
        count = min(count, system.usable_cpus)
    return count


def _cpu_facts(system, with_clocks=True):
    """CPU model, cores, frequency governor and (unless a Jetson reports them itself) clocks."""
    facts = {"cpu": cpu_model(system), "physical cores": physical_cores(system)}
    governor = system.read("sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        facts["cpu governor"] = governor.strip()
    if with_clocks:
        facts.update(_clock_facts({"CPU": cpufreq_clocks(system)})[0])
    return facts


# ---------------------------------------------------------------- CUDA

NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit",
                     "memory.total")


def nvidia_smi(system, gpu_name=None):
    """Facts about the GPU named `gpu_name` (else the first) from nvidia-smi, or None."""
    out = system.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"])
    if not out:
        return None
    rows = [dict(zip(NVIDIA_SMI_FIELDS, (v.strip() for v in line.split(",")))) for line in out.splitlines()
            if line.strip()]
    if not rows:
        return None
    row = next((r for r in rows if r["name"] == gpu_name), rows[0])
    return {
        "driver": row["driver_version"],
        "SM clock": f"{row['clocks.sm']} MHz (max {row['clocks.max.sm']} MHz)",
        "memory clock": f"{row['clocks.mem']} MHz",
        "power limit": f"{row['power.limit']} W",
        "GPU memory": f"{row['memory.total']} MiB",
    }


def detect_cuda(system, threads=None, via=API):
    gpu = system.cuda_device()
    if gpu is None:
        raise UserError(f"{option('device', 'cuda', via)}: PyTorch sees no CUDA GPU here (CPU-only torch build, "
                        f"no driver, or CUDA_VISIBLE_DEVICES hides it); use {option('device', 'cpu', via)}")
    facts = {"gpu": gpu["name"], "compute capability": gpu["capability"], "CUDA (torch)": gpu["cuda"]}
    smi = nvidia_smi(system, gpu["name"])
    if smi:
        facts.update(smi)
    else:  # no nvidia-smi: what PyTorch knows
        facts["GPU memory"] = f"{gpu['memory_mb']} MiB"
        facts["clocks"] = "unknown (nvidia-smi not available)"
    facts.update(_cpu_facts(system))
    return _profile("cuda", gpu["name"], system, threads, facts, cuda=True)


# ---------------------------------------------------------------- Jetson

def jetson_model(system):
    """Module name from the device tree (e.g. 'NVIDIA Jetson AGX Orin Developer Kit'), or None."""
    text = system.read("proc/device-tree/model")
    return text.replace("\x00", "").strip() if text else None


def is_jetson(system):
    model = jetson_model(system) or ""
    return system.exists("etc/nv_tegra_release") or "jetson" in model.lower()


def l4t_release(system):
    """'R36.3.0' from '# R36 (release), REVISION: 3.0, ...' in /etc/nv_tegra_release."""
    text = system.read("etc/nv_tegra_release") or ""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def power_mode(system):
    """'MAXN (mode 0)' from `nvpmodel -q`, or None."""
    out = system.run(["nvpmodel", "-q"])
    if not out:
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)(?:\s*\n\s*(\d+))?", out)
    if not m:
        return None
    return f"{m.group(1)} (mode {m.group(2)})" if m.group(2) else m.group(1)


@dataclass
class Clock:
    """One clock domain in MHz."""
    min: float
    max: float
    cur: float
    override: Optional[bool] = None   # EMC: jetson_clocks sets FreqOverride=1

    @property
    def locked(self):
        if self.override is not None:
            return self.override
        return self.min == self.max

    def describe(self):
        state = "locked" if self.locked else "scaling"
        return f"{self.cur:g} MHz ({state}, {self.min:g}-{self.max:g})"


def parse_jetson_clocks(text):
    """`jetson_clocks --show` -> ({'CPU': [Clock...], 'GPU': Clock, 'EMC': Clock}, dla_cores)."""
    clocks = {"CPU": []}
    for line in text.splitlines():
        line = line.strip()
        cpu = re.match(r"cpu\d+:(.*)MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", line)
        if cpu and "Online=0" not in cpu.group(1):
            clocks["CPU"].append(Clock(*(int(v) / 1e3 for v in cpu.groups()[1:])))  # kHz
        gpu = re.match(r"GPU MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", line)
        if gpu:
            clocks["GPU"] = Clock(*(int(v) / 1e6 for v in gpu.groups()))  # Hz
        emc = re.match(r"EMC MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)(?: FreqOverride=(\d))?", line)
        if emc:
            override = None if emc.group(4) is None else emc.group(4) == "1"
            clocks["EMC"] = Clock(*(int(v) / 1e6 for v in emc.groups()[:3]), override=override)
    dla = set(re.findall(r"^DLA(\d+)_CORE:", text, flags=re.MULTILINE))
    return clocks, len(dla)


def cpufreq_clocks(system):
    """One Clock per CPU core with a readable cpufreq folder (kHz in sysfs)."""
    clocks = []
    for folder in system.glob("sys/devices/system/cpu/cpu[0-9]*/cpufreq"):
        values = [system.read_int(f"{folder}/scaling_{k}_freq") for k in ("min", "max", "cur")]
        if None not in values:
            clocks.append(Clock(*(v / 1e3 for v in values)))
    return clocks


def sysfs_clocks(system):
    """The same facts from sysfs (readable without root): cpufreq and the GPU's devfreq (Hz)."""
    clocks = {"CPU": cpufreq_clocks(system)}
    for folder in system.glob("sys/class/devfreq/*"):
        if os.path.basename(folder).split(".")[-1] in JETSON_GPU_DEVFREQ:
            values = [system.read_int(f"{folder}/{k}_freq") for k in ("min", "max", "cur")]
            if None not in values:
                clocks["GPU"] = Clock(*(v / 1e6 for v in values))
                break
    nodes = system.glob("sys/devices/platform/*nvdla*") + system.glob("sys/devices/platform/*/*nvdla*")
    dla = {m.group(1) for p in nodes if (m := re.search(r"nvdla(\d+)$", p))}
    return clocks, len(dla)


def _clock_facts(clocks):
    """Report lines + overall lock state (None when neither CPU nor GPU clocks could be read)."""
    facts, states = {}, []
    cpus = clocks["CPU"]
    if cpus:
        locked = all(c.locked for c in cpus)
        states.append(locked)
        facts["CPU clocks"] = (f"{len(cpus)} cores, {min(c.cur for c in cpus):g}-{max(c.cur for c in cpus):g} MHz "
                               f"(max {max(c.max for c in cpus):g}, {'locked' if locked else 'scaling'})")
    for domain in ("GPU", "EMC"):
        if domain in clocks:
            facts[f"{domain} clock"] = clocks[domain].describe()
            states.append(clocks[domain].locked)
    if "GPU" not in clocks and not cpus:
        return facts, None
    return facts, all(states)


def detect_jetson(system, threads=None, via=API):
    if not is_jetson(system):
        raise UserError(f"{option('device', 'jetson-orin', via)}: this machine is not a Jetson (no "
                        "/etc/nv_tegra_release and /proc/device-tree/model does not name a Jetson); use "
                        f"{option('device', 'cpu', via)} or {option('device', 'cuda', via)}")
    model = jetson_model(system) or "NVIDIA Jetson (unknown model)"
    facts = {"module": model, "L4T": l4t_release(system) or "unknown",
             "power mode": power_mode(system) or "unknown (`nvpmodel -q` failed)"}
    warnings = []
    if "orin" not in model.lower():
        warnings.append(f"the jetson-orin profile expects an Orin module, this is '{model}'")
    shown = system.run(["jetson_clocks", "--show"])  # usually needs root; sysfs is the fallback
    clocks, dla_cores = parse_jetson_clocks(shown) if shown else sysfs_clocks(system)
    clock_facts, locked = _clock_facts(clocks)
    facts.update(clock_facts)
    facts["clocks source"] = "jetson_clocks --show" if shown else "sysfs"
    if locked is None:
        facts["clocks"] = "unknown"
        warnings.append(f"could not read the clock state (jetson_clocks --show failed, sysfs unreadable); {LOCK_HINT}")
    elif not locked:
        warnings.append(f"clocks are NOT locked: frequencies scale with load and latency will vary; {LOCK_HINT}")
    facts["jetson_clocks"] = {True: "on (clocks locked)", False: "off", None: "unknown"}[locked]
    facts["DLA cores"] = dla_cores
    gpu = system.cuda_device()
    if gpu is None:
        warnings.append("PyTorch has no CUDA here: the torch backend runs on the CPU (install the JetPack torch wheel)")
    facts.update(_cpu_facts(system, with_clocks=False))
    profile = _profile("jetson-orin", model, system, threads, facts, cuda=gpu is not None, warnings=warnings)
    profile.clocks_locked = locked
    profile.dla_cores = dla_cores
    return profile


# ---------------------------------------------------------------- machine load

def load_sample(system=None):
    """(1-minute load average, (steal, total) CPU jiffies of /proc/stat) now; None where unreadable."""
    system = system or System.local()
    text = system.read("proc/loadavg")
    try:
        load = float(text.split()[0]) if text else os.getloadavg()[0]
    except (ValueError, IndexError, OSError, AttributeError):
        load = None
    jiffies = None
    for line in (system.read("proc/stat") or "").splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 8:  # user nice system idle iowait irq softirq steal
            values = [int(v) for v in fields[1:9]]
            jiffies = (values[7], sum(values))
            break
    return load, jiffies


def load_during(before, after, cpus=None):
    """Machine load around one measurement: load averages before and after, the share of CPU time
    the hypervisor stole in between (percent; None without /proc/stat) and the CPU count."""
    (load_before, jiffies_before), (load_after, jiffies_after) = before, after
    steal = None
    if jiffies_before and jiffies_after and jiffies_after[1] > jiffies_before[1]:
        steal = 100.0 * (jiffies_after[0] - jiffies_before[0]) / (jiffies_after[1] - jiffies_before[1])
    return {"load_before": load_before, "load_after": load_after, "steal_pct": steal,
            "cpus": cpus or os.cpu_count()}


# ---------------------------------------------------------------- entry point

def _profile(kind, name, system, threads, facts, cuda, warnings=()):
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    source = "--threads" if threads else "physical cores"
    return DeviceProfile(kind=kind, name=name, threads=threads or physical_cores(system), threads_source=source,
                         cuda=cuda, facts=facts, warnings=list(warnings))


def detect(kind, threads=None, system=None, via=API):
    """The DeviceProfile of `kind` on this machine; UserError when the machine is not one (naming the
    device option as the caller gave it, `via`: naming.CLI / CONFIG / API)."""
    system = system or System.local()
    if kind == "cpu":
        facts = _cpu_facts(system)
        return _profile("cpu", facts["cpu"], system, threads, facts, cuda=False)
    if kind == "cuda":
        return detect_cuda(system, threads, via)
    if kind == "jetson-orin":
        return detect_jetson(system, threads, via)
    raise UserError(f"device must be one of {', '.join(DEVICES)}, got '{kind}'")


def apply_threads(threads):
    """Pin torch's intra-op threads (onnxruntime gets the same number through its session options)."""
    import torch  # memory: torch only where a torch row or a CUDA query needs it

    torch.set_num_threads(threads)
