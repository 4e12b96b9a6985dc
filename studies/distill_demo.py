"""Does the demo's distill stage gain at the demo's budget? (issue 42, item 9)

A demo family's shipped configs (configs/demo: DINO for pipeline.yaml, RT-DETR for rt_detr_pipeline.yaml;
teacher 12 epochs, the student and its CLoCK distill config 8 epochs on 400 synthetic training images) over
paired seeds: baseline and CLoCK of seed s share the student's initialization and data order. The runs are
distill_ab's machinery at the demo's budget (its own data, run files, teacher weights and report; only runs of
one machine type pair); students are scored on a test split of 400 scenes generated with another seed. The
rule that decides what the demo says is RULE, written before the runs.

    python -m studies.distill_demo [--family rt_detr] [--seeds 6] [--jobs 1]
    python -m studies.distill_demo --report-only      # rewrite the report from the run files
"""
import argparse
import sys

from studies import bookkeeping as bk
from studies import distill_ab

# demo family -> (its pipeline config, its distill config, its report)
DEMOS = {"dino": ("configs/demo/pipeline.yaml", "configs/demo/distill.yaml", "studies/results/distill_demo.md"),
         "rt_detr": ("configs/demo/rt_detr_pipeline.yaml", "configs/demo/rt_detr_distill.yaml",
                     "studies/results/distill_demo_rt_detr.md")}
SEEDS = 6
# distill_ab's options that make its runs the demo's: configs/demo at the demo's epochs and image counts
DEMO_BUDGET = ["--variants", "baseline", "clock", "--epochs", "8", "--teacher-epochs", "12",
               "--train-images", "400", "--tuning-images", "200", "--test-images", "400"]
RULE = ("Rule (written before the runs): the demo pipeline keeps CLoCK ({distill}) as a stage that "
        "gains only if CLoCK - baseline test mAP over the paired seeds has a 95% CI lower bound above 0; otherwise "
        "the demo's table says plainly that distillation does not gain at this budget.")


def verdict_lines(runs):
    """The rule read off the paired runs ({variant: {seed: record}})."""
    st = bk.paired_delta(distill_ab.by_seed(runs.get("baseline", {}), "mAP"),
                         distill_ab.by_seed(runs.get("clock", {}), "mAP"))
    if st is None or st["n"] < 2:
        return ["Verdict: nothing to read yet (fewer than 2 paired seeds)."]
    gains = st["ci"][0] > 0
    return [f"Verdict on {st['n']} paired seeds: CLoCK - baseline test mAP {st['mean']:+.4f}, 95% CI "
            f"[{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}], p {bk.p_text(st['p'])}: "
            + ("the lower bound is above 0, distillation gains at the demo's budget."
               if gains else "the lower bound is not above 0, distillation is **not shown to gain** at the "
               "demo's budget.")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="dino", choices=list(DEMOS), help="the demo's family")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one thread each")
    parser.add_argument("--machine", help="pair the runs of this machine type (default: the one with most runs)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the run files")
    parser.add_argument("--out", default="bench_out/distill_demo", help="data and run folders (checkpoints)")
    parser.add_argument("--runs-dir", default="studies/results/distill_demo_runs",
                        help="one json per finished run (commit these)")
    parser.add_argument("--teachers-dir", default="studies/results/distill_demo_teachers",
                        help="the teacher's weights (commit these)")
    parser.add_argument("--results", help="the report (default: the family's in DEMOS)")
    args = parser.parse_args(argv)
    pipeline, distill_config, results_path = DEMOS[args.family]
    args.results = args.results or results_path
    paths = ["--out", args.out, "--runs-dir", args.runs_dir, "--teachers-dir", args.teachers_dir]
    ab_args = distill_ab.parse_args(DEMO_BUDGET + paths + ["--families", args.family, "--seeds", str(args.seeds),
                                                           "--jobs", str(args.jobs)]
                                    + (["--machine", args.machine] if args.machine else [])
                                    + (["--report-only"] if args.report_only else []))
    if not args.report_only:
        distill_ab.ensure_data(ab_args)
    results = distill_ab.collect(ab_args)
    family_text, runs = distill_ab.family_lines(args.family, results[args.family], args.machine)
    lines = [f"The demo's budget: {pipeline}'s configs ({args.family}), {ab_args.train_images} training images "
             f"(seed 0 scenes) x {ab_args.epochs} epochs per student, teacher {ab_args.teacher_epochs} epochs; "
             f"scored on a test split of {ab_args.test_images} scenes of seed 1 (the 'tuning' split is the demo's "
             "own validation split, not read for any choice: nothing is tuned here).", "",
             RULE.format(distill=distill_config), ""]
    lines += family_text + [""] + verdict_lines(runs)
    lines += ["", "delta: CLoCK minus the baseline of the same seed; 95% CI: mean +- t(0.975, n-1) sd / sqrt(n); "
              f"p: two-sided paired t-test. Run files: {args.runs_dir}/."]
    command = "python -m studies.distill_demo " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                            if a != "--report-only")
    bk.write_report(args.results, "Distillation at the demo's budget (written by studies/distill_demo.py)", lines,
                    command.strip())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
