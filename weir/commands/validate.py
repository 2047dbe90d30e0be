"""``weir validate SPEC``: check a pipeline spec and its model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a pipeline spec; exits 1 listing every fault")
    p.add_argument("spec", help="path of the pipeline YAML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    from models.factory import build_model, check_task

    check_task(build_model(spec.model), spec.task)
    print(
        f"{args.spec}: ok — pipeline {spec.name!r} ({spec.task}), "
        f"{len(spec.fields)} fields, {len(spec.features)} features, model {spec.model.name!r}"
    )
    return 0
