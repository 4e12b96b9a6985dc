import os

import pytest

from clock_deploy.measure.devices import Clock, System, detect, load_during, load_sample, parse_jetson_clocks
from clock_deploy.errors import UserError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "jetson")


def fake_system(board, commands=None, cuda=None, usable_cpus=None):
    """A System rooted at a fixture board; `commands` maps argument tuples to fixture output files."""
    root = os.path.join(FIXTURES, board)
    calls = []

    def run(args):
        calls.append(tuple(args))
        name = (commands or {}).get(tuple(args))
        if name is None:
            return None  # command missing or failing (e.g. jetson_clocks without root)
        with open(os.path.join(root, "commands", name)) as f:
            return f.read()

    system = System(root=root, run=run, cuda_device=lambda: cuda, usable_cpus=usable_cpus)
    system.calls = calls
    return system


ORIN_GPU = {"name": "Orin", "memory_mb": 62797, "capability": "8.7", "cuda": "12.2"}
NVPMODEL = ("nvpmodel", "-q")
CLOCKS = ("jetson_clocks", "--show")


def test_orin_agx_with_locked_clocks():
    system = fake_system("orin_agx", {NVPMODEL: "nvpmodel_q.txt", CLOCKS: "jetson_clocks_show_locked.txt"},
                         cuda=ORIN_GPU)
    p = detect("jetson-orin", system=system)
    assert p.kind == "jetson-orin" and p.name == "NVIDIA Jetson AGX Orin Developer Kit"
    assert p.facts["L4T"] == "R36.3.0"
    assert p.facts["power mode"] == "MAXN (mode 0)"
    assert p.clocks_locked is True and p.facts["jetson_clocks"] == "on (clocks locked)"
    assert p.facts["GPU clock"] == "1300.5 MHz (locked, 1300.5-1300.5)"
    assert p.facts["EMC clock"] == "3199 MHz (locked, 204-3199)"
    assert p.facts["CPU clocks"] == "12 cores, 2201.6-2201.6 MHz (max 2201.6, locked)"
    assert p.facts["clocks source"] == "jetson_clocks --show"
    assert p.dla_cores == 2
    assert p.facts["cpu"] == "ARM Cortex-A78AE"
    assert p.threads == 12 and p.threads_source == "physical cores"
    assert p.cuda and p.torch_device == "cuda"
    assert p.warnings == []
    # commands are argument lists, never shell strings
    assert NVPMODEL in system.calls and CLOCKS in system.calls


def test_orin_agx_with_unlocked_clocks_warns():
    system = fake_system("orin_agx", {NVPMODEL: "nvpmodel_q.txt", CLOCKS: "jetson_clocks_show_unlocked.txt"},
                         cuda=ORIN_GPU)
    p = detect("jetson-orin", threads=4, system=system)
    assert p.clocks_locked is False and p.facts["jetson_clocks"] == "off"
    assert p.facts["GPU clock"] == "306 MHz (scaling, 306-1300.5)"
    assert p.facts["EMC clock"] == "2133 MHz (scaling, 204-3199)"
    assert p.facts["CPU clocks"] == "12 cores, 1113.6-2201.6 MHz (max 2201.6, scaling)"
    assert p.threads == 4 and p.threads_source == "--threads"
    assert len(p.warnings) == 1
    assert "NOT locked" in p.warnings[0] and "sudo jetson_clocks" in p.warnings[0]
    header = dict(p.header())
    assert header["threads"] == "4 (--threads)" and header["power mode"] == "MAXN (mode 0)"


def test_orin_nano_without_root_reads_sysfs():
    # jetson_clocks --show fails without root: clocks come from cpufreq / devfreq, which anyone can read
    p = detect("jetson-orin", system=fake_system("orin_nano", {NVPMODEL: "nvpmodel_q.txt"}, cuda=None))
    assert p.name == "NVIDIA Orin Nano Developer Kit"  # no "Jetson" in the name: found by nv_tegra_release
    assert p.facts["L4T"] == "R35.4.1"
    assert p.facts["power mode"] == "15W (mode 0)"
    assert p.facts["clocks source"] == "sysfs"
    assert p.facts["GPU clock"] == "306 MHz (scaling, 306-624.75)"  # the ga10b devfreq, not the VIC
    assert p.facts["CPU clocks"] == "6 cores, 729.6-1510.4 MHz (max 1510.4, scaling)"
    assert "EMC clock" not in p.facts
    assert p.clocks_locked is False
    assert p.dla_cores == 0
    assert p.threads == 6
    assert p.facts["cpu governor"] == "schedutil"
    # no CUDA torch: torch runs on the CPU and the report says why
    assert not p.cuda and p.torch_device == "cpu"
    assert any("NOT locked" in w for w in p.warnings)
    assert any("PyTorch has no CUDA" in w for w in p.warnings)


def test_jetson_without_any_clock_source_says_unknown():
    p = detect("jetson-orin", system=fake_system("orin_agx", {}, cuda=ORIN_GPU))
    assert p.clocks_locked is None
    assert p.facts["power mode"].startswith("unknown")
    assert any("could not read the clock state" in w for w in p.warnings)


def test_non_jetson_x86_refuses_jetson_profile_and_describes_its_cpu():
    system = fake_system("x86", {}, usable_cpus=None)
    with pytest.raises(UserError, match="not a Jetson"):
        detect("jetson-orin", system=system)
    p = detect("cpu", system=system)
    assert p.name == "Intel(R) Core(TM) i7-7700K CPU @ 4.20GHz"
    assert p.threads == 4  # 8 hyper-threads on 4 physical cores
    assert p.facts["cpu governor"] == "powersave"
    assert p.facts["CPU clocks"] == "8 cores, 800-4200 MHz (max 4500, scaling)"
    assert dict(p.header())["physical cores"] == "4"
    assert not p.cuda and p.torch_device == "cpu"
    # a container that may use only 2 CPUs gets 2 threads by default
    assert detect("cpu", system=fake_system("x86", usable_cpus=2)).threads == 2
    with pytest.raises(UserError, match="threads must be >= 1"):
        detect("cpu", threads=0, system=system)
    with pytest.raises(UserError, match="device must be one of"):
        detect("tpu", system=system)


def test_cuda_profile_from_nvidia_smi_and_clear_error_without_cuda():
    gpu = {"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24268, "capability": "8.6", "cuda": "12.4"}
    smi = ("nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
           "memory.total", "--format=csv,noheader,nounits")
    p = detect("cuda", system=fake_system("x86", {smi: "nvidia_smi.txt"}, cuda=gpu))
    assert p.name == "NVIDIA GeForce RTX 3090" and p.torch_device == "cuda"
    assert p.facts["driver"] == "550.54.14"
    assert p.facts["SM clock"] == "210 MHz (max 2100 MHz)"
    assert p.facts["power limit"] == "350.00 W"
    # without nvidia-smi the profile falls back to what torch knows
    p = detect("cuda", system=fake_system("x86", {}, cuda=gpu))
    assert p.facts["GPU memory"] == "24268 MiB" and "unknown" in p.facts["clocks"]
    with pytest.raises(UserError, match="device='cuda': PyTorch sees no CUDA GPU.*; use device='cpu'$"):
        detect("cuda", system=fake_system("x86", {}, cuda=None))
    with pytest.raises(UserError, match="^--device cuda: PyTorch sees no CUDA GPU.*; use --device cpu$"):
        detect("cuda", system=fake_system("x86", {}, cuda=None), via="cli")


def test_parse_jetson_clocks_skips_offline_cores_and_reads_emc_override():
    text = ("cpu0: Online=1 Governor=schedutil MinFreq=100 MaxFreq=200 CurrentFreq=150 IdleStates: WFI=1\n"
            "cpu1: Online=0 Governor=schedutil MinFreq=100 MaxFreq=100 CurrentFreq=100 IdleStates: WFI=1\n"
            "GPU MinFreq=5000000 MaxFreq=5000000 CurrentFreq=5000000\n"
            "EMC MinFreq=1000000 MaxFreq=2000000 CurrentFreq=2000000 FreqOverride=1\n"
            "DLA0_CORE:   Online=1 MinFreq=0 MaxFreq=1 CurrentFreq=1\n")
    clocks, dla = parse_jetson_clocks(text)
    assert clocks["CPU"] == [Clock(0.1, 0.2, 0.15)]
    assert clocks["GPU"].locked and clocks["GPU"].cur == 5.0
    assert clocks["EMC"].locked and clocks["EMC"].override is True
    assert dla == 1


def test_machine_load_around_a_measurement(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    system = System(root=str(tmp_path))

    def sample(load, steal, total):  # /proc/stat: user nice system idle iowait irq softirq steal
        (proc / "loadavg").write_text(f"{load} 0.50 0.40 2/300 1234\n")
        (proc / "stat").write_text(f"cpu  {total - steal} 0 0 0 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
        return load_sample(system)

    before = sample(0.25, steal=100, total=1000)
    after = sample(3.5, steal=160, total=1400)
    assert load_during(before, after, cpus=2) == {"load_before": 0.25, "load_after": 3.5, "steal_pct": 15.0,
                                                  "cpus": 2}
    (proc / "stat").unlink()  # no /proc/stat (macOS): the load average alone, steal unknown
    assert load_during(load_sample(system), load_sample(system), cpus=2)["steal_pct"] is None
