"""Is the RT-DETR student the fast one? Side by side in one run (issue 41, done-when item 7).

(a) Students of comparable parameter count, built from one config (default configs/demo/student.yaml)
    with model.arch set per row:
    - rt_detr: RT-DETR R18vd-like: ResNet-vd 18, one AIFI layer + CCFF with expansion 0.5 (RT-DETR's
      R18 / R34 value), the config's decoder; everything else as the config says;
    - dino / deformable_detr at the encoder depth that brings their parameter count closest to the
      RT-DETR student's (the encoder is the one part whose size the families do not share: same
      backbone width, hidden size, decoder, queries); the config's own depth as reference rows.
    Measured: ONNX Runtime CPU latency (each exported with clock_deploy's export_onnx, in-graph top-k,
    batch 1, runs of all models interleaved, median + p90) and training step time (forward + loss +
    backward + AdamW step on a fixed random batch of train.batch_size, steps interleaved, median).
(b) Our RT-DETR against transformers' RTDetrV2ForObjectDetection at RT-DETRv2-S (R18vd) size, 80 classes,
    random weights (every tensor perturbed), imported with `clock-deploy import`'s code and run as the
    torch backend runs a checkpoint (runtime/backend_torch.py's inference_model: models/fuse.py's folds,
    then runtime/cpu_layout.py's packed channels_last convs): forward latency (interleaved, median),
    peak memory of one forward (each in a fresh process: peak RSS growth during the first forward, VmHWM
    reset through /proc/self/clear_refs; bench_reference.py's method), and the max abs difference of
    logits and boxes. Two more rows in the same interleaving say where the gain comes from: ours fused
    only (plain eager convs), and transformers' model with channels_last weights and input.

    python benchmarks/bench_realtime.py [--threads 2] [--runs 30] [--steps 8] [--ref-runs 10]
                                        [--ref-sizes 128x416,384x1248]

--threads sets torch's and onnxruntime's threads and OMP_NUM_THREADS of the memory subprocesses
(default 2). --tiny: tiny models at 64x192 (smoke run, tests/test_bench_realtime.py).
Writes benchmarks/results/realtime.md (+ .json).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark modules
from bench_reference import forward, peak_memory  # noqa: E402
from bench_train import step_runner  # noqa: E402
from random_batch import random_batch  # noqa: E402

from clock_deploy.config import load_config  # noqa: E402
from clock_deploy.io import write_json, write_text  # noqa: E402
from clock_deploy.measure.devices import detect  # noqa: E402
from clock_deploy.measure.latency import summarize  # noqa: E402
from clock_deploy.models.build import build_model  # noqa: E402
from clock_deploy.models.fuse import fuse_for_inference  # noqa: E402
from clock_deploy.runtime.backend_torch import inference_model  # noqa: E402

RT_DETR = ["model.arch=rt_detr", "model.rt_detr.expansion=0.5"]  # R18vd-like: RT-DETR's CCFF width for R18 / R34
TINY = ["data.img_size=[64,192]", "model.backbone.width=8", "model.hidden_dim=32", "model.ffn_dim=64",
        "model.num_queries=20", "model.dn.num_queries=10", "train.batch_size=2", "export.topk=10"]
OUTPUT_TOLERANCE = 1e-4  # max abs difference of logits / boxes for "outputs equal" (tests/test_rt_detr.py's bound)


# ---------------------------------------------------------------- (a) students

def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def matched_encoder_layers(config, overrides, target, max_layers=8):
    """The model.enc_layers in 1..max_layers whose parameter count is closest to `target`."""
    counts = {n: parameter_count(build_model(load_config(config, overrides + [f"model.enc_layers={n}"]).model))
              for n in range(1, max_layers + 1)}
    return min(counts, key=lambda n: abs(counts[n] - target))


def student_configs(config, tiny=False):
    """(row name -> Config, names of the rows matched in size): the RT-DETR student, DINO and Deformable
    DETR at its parameter count, and both at the config's own encoder depth (unless that is the matched one)."""
    extra = TINY if tiny else []
    rt_detr = load_config(config, extra + RT_DETR)
    target = parameter_count(build_model(rt_detr.model))
    rows, matched = {"rt_detr": rt_detr}, []
    base_layers = load_config(config, extra).model.enc_layers
    for arch in ("dino", "deformable_detr"):
        overrides = extra + [f"model.arch={arch}"]
        layers = matched_encoder_layers(config, overrides, target)
        rows[f"{arch}_enc{layers}"] = load_config(config, overrides + [f"model.enc_layers={layers}"])
        matched.append(f"{arch}_enc{layers}")
        if layers != base_layers:
            rows[f"{arch}_enc{base_layers}"] = load_config(config, overrides)
    return rows, matched


def interleaved(calls, runs, warmup):
    """ms per call of each callable, rounds of all callables interleaved so load drift hits all alike."""
    times = {name: [] for name in calls}
    for i in range(warmup + runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def onnx_latencies(configs, folder, runs, threads, warmup=3, simplify=True):
    """Row name -> LatencyStats (ms) of its ONNX (batch 1 at data.img_size) in onnxruntime on the CPU."""
    import onnxruntime as ort

    from clock_deploy.export.onnx import export_onnx

    sessions = {}
    for name, cfg in configs.items():
        torch.manual_seed(cfg.seed)
        height, width = cfg.data.img_size
        path = os.path.join(folder, f"{name}.onnx")
        export_onnx(build_model(cfg.model).eval(), path, height=height, width=width, topk=cfg.export.topk,
                    simplify=simplify)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: image})) for name, s in sessions.items()}
    return {name: summarize(t) for name, t in interleaved(calls, runs, warmup).items()}


def train_step_times(configs, steps, warmup=2):
    """Row name -> (parameters, LatencyStats in ms of one training step on one fixed random batch)."""
    runners, params = {}, {}
    for name, cfg in configs.items():
        runners[name], params[name] = step_runner(cfg)
    images, targets = random_batch(next(iter(configs.values())), torch.Generator().manual_seed(0))
    calls = {name: (lambda run=run: run(images, targets)) for name, run in runners.items()}
    return {name: (params[name], summarize(t)) for name, t in interleaved(calls, steps, warmup).items()}


# ---------------------------------------------------------------- (b) against transformers

def hf_rt_detr_config(small=False):
    """transformers RT-DETRv2-S: ResNet-vd 18, CCFF expansion 0.5, 3 decoder layers, 80 classes (else
    the RTDetrV2Config defaults: hidden 256, 300 queries, 4 points per level); small: tests/conftest.py's
    make_hf_rt_detr size."""
    import transformers

    width = 8 if small else 64
    backbone = transformers.RTDetrResNetConfig(embedding_size=width, hidden_sizes=[width * 2 ** i for i in range(4)],
                                               depths=[2, 2, 2, 2], layer_type="basic", out_indices=[2, 3, 4])
    settings = dict(backbone_config=backbone, encoder_in_channels=backbone.hidden_sizes[1:], hidden_expansion=0.5,
                    decoder_layers=3, num_labels=80)
    if small:
        settings.update(encoder_hidden_dim=32, d_model=32, decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64,
                        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=20,
                        num_labels=3, num_denoising=10)
    return transformers.RTDetrV2Config(**settings)


def build_reference_pair(folder, small=False):
    """(transformers model, hf folder, project model, project checkpoint), same weights, eval mode."""
    import transformers

    from clock_deploy.checkpoint import load_model
    from clock_deploy.convert.importer import import_to_checkpoint

    torch.manual_seed(0)
    hf_model = transformers.RTDetrV2ForObjectDetection(hf_rt_detr_config(small)).eval()
    with torch.no_grad():  # zero heads / offsets and BN at its init would hide differences (as tests/conftest.py)
        for name, tensor in hf_model.state_dict().items():
            if name.endswith("running_var") or name.endswith("norm.weight") or name.endswith("normalization.weight"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point() and not name.endswith("n_points_scale"):
                tensor.add_(torch.randn_like(tensor) * 0.02)
    hf_dir, ckpt = os.path.join(folder, "hf"), os.path.join(folder, "project.pt")
    hf_model.save_pretrained(hf_dir)
    import_to_checkpoint(hf_dir, ckpt)
    return hf_model, hf_dir, load_model(ckpt)[0], ckpt


def query_pairing(ref, own):
    """For each image, the transformers query index of each project query: the one that selected the same
    memory token (closest encoder box + score, one to one), and the largest abs difference of the paired
    encoder boxes and scores. Random weights
    give many tokens the same selection score (e.g. every masked border token), and the two top-ks may
    order tied tokens differently, so outputs are compared query by query only after this pairing."""
    from scipy.optimize import linear_sum_assignment

    ref_key = torch.cat([ref.enc_topk_bboxes, ref.enc_topk_logits], -1)
    own_key = torch.cat([own.encoder.boxes, own.encoder.logits], -1)
    order, worst = [], 0.0
    for b in range(own_key.shape[0]):
        cost = torch.cdist(own_key[b], ref_key[b], compute_mode="donot_use_mm_for_euclid_dist")  # exact distances
        rows, cols = linear_sum_assignment(cost.numpy())
        order.append(torch.as_tensor(cols)[torch.as_tensor(rows).argsort()])
        worst = max(worst, (own_key[b, rows] - ref_key[b, cols]).abs().max().item())
    return torch.stack(order), worst


def output_differences(hf_model, model, images):
    """Max abs difference of logits and of boxes between transformers' and the project's forward:
    "paired" (queries paired by their selected token, query_pairing), "by_index" (query i with query i),
    and the largest difference of the paired queries' encoder boxes / scores."""
    with torch.inference_mode():
        ref, own = hf_model(pixel_values=images), model(images)
    last = own.stages[-1]
    order, distance = query_pairing(ref, own)
    pick = order[..., None]
    ref_logits = ref.logits.gather(1, pick.expand(-1, -1, ref.logits.shape[-1]))
    ref_boxes = ref.pred_boxes.gather(1, pick.expand(-1, -1, 4))
    return {"paired": ((ref_logits - last.logits).abs().max().item(), (ref_boxes - last.boxes).abs().max().item()),
            "by_index": ((ref.logits - last.logits).abs().max().item(),
                         (ref.pred_boxes - last.boxes).abs().max().item()),
            "pairing_distance": distance}


def outputs_equal(diffs, tolerance=OUTPUT_TOLERANCE):
    """Logits and boxes within `tolerance` once queries are paired by the token they selected."""
    return max(diffs["paired"]) <= tolerance


def reference_rows(folder, sizes, runs, threads, small=False, warmup=2, memory=True):
    """Per input size: output differences, interleaved forward latency (ms) and peak memory (MB). "project" is
    ours as the torch backend runs a checkpoint (inference_model), "transformers" theirs as shipped; for
    attribution, ours fused only ("project fused") and theirs in channels_last ("transformers channels_last")."""
    hf_model, hf_dir, model, ckpt = build_reference_pair(folder, small)
    runtime = inference_model(copy.deepcopy(model))
    fused = fuse_for_inference(model)
    hf_channels_last = copy.deepcopy(hf_model).to(memory_format=torch.channels_last)
    rows = []
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        images_channels_last = images.contiguous(memory_format=torch.channels_last)
        diffs = output_differences(hf_model, runtime, images)
        with torch.inference_mode():
            times = interleaved({
                "project": lambda: forward("project", runtime, images),
                "project fused": lambda: forward("project", fused, images),
                "transformers": lambda: forward("transformers", hf_model, images),
                "transformers channels_last": lambda: forward("transformers", hf_channels_last, images_channels_last),
            }, runs, warmup)
        peak = ({name: peak_memory(impl, "rt_detr", path, height, width, threads) for name, impl, path in
                 (("project", "project-runtime", ckpt), ("transformers", "transformers", hf_dir))} if memory else None)
        rows.append({"size": (height, width), "diffs": diffs, "latency": {k: summarize(t) for k, t in times.items()},
                     "memory_mb": peak})
        print(f"rt_detr vs transformers {height}x{width}: {rows[-1]['latency']['project'].p50:.1f} / "
              f"{rows[-1]['latency']['transformers'].p50:.1f} ms, diffs {diffs}", flush=True)
    return parameter_count(model), rows


# ---------------------------------------------------------------- report

def machine_line(threads):
    """CPU model, cores, threads, library versions and the 1-minute load average now."""
    import onnxruntime
    import transformers

    facts = detect("cpu", threads).facts
    return (f"{facts['cpu']} ({facts['physical cores']} cores), {threads} threads (torch, onnxruntime, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, transformers {transformers.__version__}")


def student_table(configs, onnx, train):
    """Markdown rows of (a) and the ratios of each row's medians to the RT-DETR student's."""
    lines = ["| student | encoder layers | parameters | ONNX Runtime ms (median) | p90 | ONNX: RT-DETR faster by "
             "| train ms / step (median) | p90 | train: RT-DETR faster by |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for name, cfg in configs.items():
        params, step = train[name]
        ratios[name] = (onnx[name].p50 / onnx["rt_detr"].p50, step.p50 / train["rt_detr"][1].p50)
        layers = f"1 AIFI + CCFF (expansion {cfg.model.rt_detr.expansion})" if name == "rt_detr" \
            else str(cfg.model.enc_layers)
        lines.append(f"| {name} | {layers} | {params / 1e6:.3f} M | {onnx[name].p50:.2f} | {onnx[name].p90:.2f} | "
                     f"{ratios[name][0]:.2f}x | {step.p50:.0f} | {step.p90:.0f} | {ratios[name][1]:.2f}x |")
    return lines, ratios


def verdict(ratios, rows):
    """One sentence: is the RT-DETR student faster than each of `rows`, by how much (their time / its time)."""
    parts = []
    for i, what in enumerate(("ONNX Runtime latency", "training step time")):
        others = {k: ratios[k][i] for k in rows}
        closest = min(others, key=others.get)
        if others[closest] > 1:
            parts.append(f"{what}: RT-DETR is the fastest of {', '.join(rows)}; the next, {closest}, takes "
                         f"{others[closest]:.2f}x RT-DETR's time")
        else:
            parts.append(f"{what}: RT-DETR is NOT faster than {closest}, which takes {others[closest]:.2f}x "
                         f"RT-DETR's time")
    return "; ".join(parts) + "."


def reference_table(rows):
    lines = ["| input | max abs diff logits (paired queries) | boxes (paired) | logits (query i vs i) | boxes (i vs i) "
             "| outputs equal (paired, <= 1e-4) | project ms (median) | transformers ms (median) "
             "| latency project / transformers (goal <= 0.9x) | project fused only ms | transformers channels_last ms "
             "| project peak MB | transformers peak MB | memory project / transformers (goal <= 1.0x) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        latency = {name: summary.p50 for name, summary in row["latency"].items()}
        own, ref = latency["project"], latency["transformers"]
        memory = row["memory_mb"]
        mem = (f"{memory['project']:.0f} | {memory['transformers']:.0f} | "
               f"{memory['project'] / max(memory['transformers'], 1e-9):.2f}x") if memory else "- | - | -"
        paired, by_index = row["diffs"]["paired"], row["diffs"]["by_index"]
        lines.append(f"| {row['size'][0]}x{row['size'][1]} | {paired[0]:.1e} | {paired[1]:.1e} | {by_index[0]:.1e} | "
                     f"{by_index[1]:.1e} | "
                     f"{'yes' if outputs_equal(row['diffs']) else 'NO'} | {own:.1f} | {ref:.1f} | {own / ref:.2f}x | "
                     f"{latency['project fused']:.1f} ({latency['project fused'] / ref:.2f}x) | "
                     f"{latency['transformers channels_last']:.1f} ({latency['transformers channels_last'] / ref:.2f}x)"
                     f" | {mem} |")
    return lines


def report(run, res):
    """(markdown, json-able dict) of both parts; run: command, seconds, machine, load, runs, ref_runs, steps,
    tiny; res: what main measured (configs, matched, onnx, train, ref_params, ref_rows)."""
    configs, onnx, train, ref_rows = res["configs"], res["onnx"], res["train"], res["ref_rows"]
    first = next(iter(configs.values()))
    height, width = first.data.img_size
    table, ratios = student_table(configs, onnx, train)
    reference_size = ("tests/conftest.py's tiny size" if run["tiny"] else
                      "RT-DETRv2-S size (ResNet-vd 18, hidden 256, 1 AIFI layer, CCFF expansion 0.5, 3 decoder "
                      "layers, 300 queries, 80 classes)")
    lines = ["# Real-time students: RT-DETR vs DINO / Deformable DETR, and RT-DETR vs transformers\n",
             f"`{run['command']}` ({run['seconds'] / 60:.1f} min); {run['machine']}; 1-minute load average "
             f"{run['load'][0]:.1f} at the start, {run['load'][1]:.1f} at the end (a load above the thread count means "
             "other jobs shared the CPU: quote numbers from a run on a quiet machine).\n",
             "## Students of comparable size\n",
             f"Built from one config with `model.arch` per row ({', '.join(RT_DETR)} for the RT-DETR student); DINO "
             f"and Deformable DETR at the encoder depth that brings their parameter count closest to the RT-DETR "
             f"student's ({', '.join(res['matched'])}), and at the config's own depth. Random weights. ONNX: "
             f"exported with `export_onnx` (in-graph top-{first.export.topk}), batch 1 at {height}x{width}, "
             f"{run['runs']} interleaved runs in onnxruntime (CPU). Training: forward + loss + backward + AdamW step, "
             f"batch {first.train.batch_size} at {height}x{width}, {run['steps']} interleaved steps. 'faster by' = "
             "the row's median / the RT-DETR student's median (> 1: RT-DETR is faster).\n",
             *table, "",
             "At comparable parameter count: " + verdict(ratios, res["matched"]) + "\n",
             "Against every row: " + verdict(ratios, [k for k in configs if k != "rt_detr"]) + "\n",
             f"## Our RT-DETR vs transformers' RTDetrV2ForObjectDetection ({res['ref_params'] / 1e6:.1f} M "
             "parameters)\n",
             f"{reference_size}, random weights (every tensor perturbed), imported with `clock-deploy import`'s code; "
             "ours run as the torch backend runs a checkpoint (runtime/backend_torch.py's inference_model: "
             "models/fuse.py folds BatchNorm into the convs and merges the RepVGG branches, then "
             "runtime/cpu_layout.py runs the convs channels_last with weights packed once for oneDNN), for outputs, "
             "latency and memory; transformers' model as it ships. For attribution, two more rows in the same "
             "interleaving (their ratio to transformers in brackets): ours fused only (plain eager convs) and "
             "transformers' model with channels_last weights and input. "
             f"Batch 1; latency = median of {run['ref_runs']} interleaved forwards (torch, inference mode); memory = "
             "peak RSS growth during the first forward, each in a fresh process (VmHWM reset through "
             "/proc/self/clear_refs; bench_reference.py's method). Outputs are compared with the queries paired by the "
             "memory token each selected (encoder box + score, one to one): random weights give many tokens the same "
             "selection score, and tied tokens may come out of the two top-ks in another order (the i-vs-i columns); "
             "the paired columns say whether the two give the same detections.\n",
             *reference_table(ref_rows)]
    data = {**{k: run[k] for k in ("command", "seconds", "machine", "load")}, "matched": res["matched"],
            "students": {name: {"arch": cfg.model.arch, "enc_layers": cfg.model.enc_layers,
                                "parameters": train[name][0], "onnx_ms": vars(onnx[name]),
                                "train_step_ms": vars(train[name][1]), "rt_detr_faster_by": ratios[name]}
                         for name, cfg in configs.items()},
            "reference": {"parameters": res["ref_params"],
                          "rows": [{"size": r["size"], "max_abs_diff": r["diffs"],
                                    "outputs_equal": outputs_equal(r["diffs"]), "memory_mb": r["memory_mb"],
                                    "latency_ms": {k: vars(v) for k, v in r["latency"].items()}}
                                   for r in ref_rows]}}
    return "\n".join(lines) + "\n", data


def parse_sizes(text):
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")]


def measure_all(args, folder):
    """Everything `report` shows, measured in this order: ONNX latency, training steps, transformers pair."""
    configs, matched = student_configs(args.config, args.tiny)
    onnx = onnx_latencies(configs, folder, args.runs, args.threads, simplify=not args.tiny)
    print("ONNX Runtime ms: " + ", ".join(f"{k} {v.p50:.2f}" for k, v in onnx.items()), flush=True)
    train = train_step_times(configs, args.steps)
    print("train ms / step: " + ", ".join(f"{k} {v[1].p50:.0f}" for k, v in train.items()), flush=True)
    sizes = [(64, 96)] if args.tiny else parse_sizes(args.ref_sizes)
    ref_params, ref_rows = reference_rows(folder, sizes, args.ref_runs, args.threads, small=args.tiny)
    return dict(configs=configs, matched=matched, onnx=onnx, train=train, ref_params=ref_params, ref_rows=ref_rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo/student.yaml", help="student config the rows start from")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime / OMP threads")
    parser.add_argument("--runs", type=int, default=30, help="timed ONNX Runtime runs of each student")
    parser.add_argument("--ref-runs", type=int, default=10, help="timed forwards of each RT-DETR implementation")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--ref-sizes", default="128x416,384x1248", help="HxW inputs of the transformers comparison")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64x192 (smoke run)")
    parser.add_argument("--out", default="benchmarks/results/realtime.md")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory subprocesses
    torch.set_num_threads(args.threads)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure_all(args, tmp)
    command = " ".join([f"OMP_NUM_THREADS={args.threads} python benchmarks/bench_realtime.py",
                        *(sys.argv[1:] if argv is None else argv)])
    run = dict(command=command, machine=machine_line(args.threads), load=(load_start, os.getloadavg()[0]),
               runs=args.runs, ref_runs=args.ref_runs, steps=args.steps, tiny=args.tiny,
               seconds=time.perf_counter() - start)
    markdown, data = report(run, results)
    write_text(args.out, markdown)
    write_json(os.path.splitext(args.out)[0] + ".json", data)
    print(f"wrote {args.out}")
    return markdown, data


if __name__ == "__main__":
    main()
