"""The command line of `python train.py` (and `torchrun ... train.py`): one flag per TrainConfig
field, built by cli.py (the type from the annotation, the help from the field's comment, the
choices from train.CHOICES), plus --bench (bench.py). train.py runs `main(parse_args())` under
`__main__`; train.main(settings) is the training itself. It sits above train.py, which never
imports it.
"""

import argparse
import sys

import cli
import model
import train
from train import CHOICES, TrainConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=train.__doc__.splitlines()[0])
    # Defaults stay out of the namespace: the dataclass holds them, and --resume can tell which
    # settings were given.
    choices = dict(model=list(model.PRESETS), **CHOICES)
    cli.add_config_args(p, TrainConfig, suppress_defaults=True,
                        **{k: dict(choices=v) for k, v in choices.items()})  # fmt: skip
    p.add_argument("--bench", action="store_true", help="time one step vs the official port")
    p.add_argument("--bench-preset", default="vit_b", choices=list(model.PRESETS))
    p.add_argument("--bench-runs", type=int, default=3)
    p.add_argument("--bench-only", choices=["official", "ours"], default=None,
                   help="one variant alone, for its process peak memory")  # fmt: skip
    return p.parse_args(argv)


def main(ns: argparse.Namespace) -> None:
    """--bench, or the training (train.main) with the settings given on the command line; exits."""
    if ns.bench:
        import bench  # the benchmarks sit above the stages; only this branch needs them

        bench.train_step_cli(ns.bench_preset, ns.bench_runs, ns.bench_only)
        sys.exit()
    cli.main_guard(train.main, cli.config_values(TrainConfig, ns), "train.py")
