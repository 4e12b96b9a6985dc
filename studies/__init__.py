"""Research studies on clock-deploy, kept apart from the product: never installed with it (pyproject's
packages.find includes clock_deploy* only) and never imported by clock_deploy.

- bookkeeping: what every study shares (run registry and keys, machine record, paired statistics, reports).
- distill_ab: the live distillation A/B, `python -m studies.distill_ab`.
- distill_demo: the demo's distill stage against its baseline at the demo's budget (distill_ab's runs at
  that budget), `python -m studies.distill_demo`.
- archive/: reports and run files of retired studies, each naming the commit that produced it.
"""
