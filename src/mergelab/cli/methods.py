"""`mergelab methods`: every merge method with its parameters and defaults (imports no torch)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from mergelab.methods import list_methods
    print(f"defaults under {args.compat} semantics (recipes: mergekit unless 'compat: paper'; "
          "mergelab methods --compat paper|mergekit)")
    for m in list_methods():
        alias = f" (alias: {', '.join(m.aliases)})" if m.aliases else ""
        base = "needs base" if m.needs_base else "no base needed"
        print(f"{m.name}{alias} - {m.summary}  [{base}; {m.reference}]")
        if m.formula:
            print(f"    formula: {m.formula}")
        for p in m.params_for(args.compat):
            scope = "per model" if p.per_model else "global"
            extra = f" one of {'|'.join(p.choices)}" if p.choices else ""
            rng = f" in [{p.low}, {p.high}]" if p.low is not None else ""
            names = "/".join((p.name, *p.aliases))
            print(f"    {names:<22} {p.kind.__name__:<5} default {p.default_for(args.compat)!r:<8} {scope:<9}"
                  f"{rng}{extra} - {p.help}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    p.add_argument("--compat", choices=("paper", "mergekit"), default="mergekit",
                   help="show the defaults of this semantics (default mergekit, as recipes)")
    p.set_defaults(func=_run)
