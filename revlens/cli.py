"""``revlens`` command line: train and evaluate toy models, and reproduce the notebook suite.

    revlens train --objective mdm --positional rotary --seed 0 --out runs/mdm0
    revlens evaluate runs/mdm0
    revlens sweep data/ablations_sweep.json --out data/ablations.jsonl
    revlens sweep data/routing_sweep.json --out data/routing.jsonl    # notebook 06 (routing world)
    revlens small-pair           # retrains data/small_pair (LLaDA-arch MDM + matched LLaMA-arch ARM)
    revlens facts /models/LLaDA-8B-Base --device cuda   # forward/reverse accuracy on data/real_facts.json
    revlens text-reversal DATA_DIR --out runs/text   # MDM vs ARM on a reversal dataset (Berglund et al. layout)
    revlens reproduce            # runs notebooks/NN_*.ipynb headless, writes reports/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from revlens.config import ATTENTION_DIRS, MAX_SEED, POSITIONALS, EncoderConfig, number_option
from revlens.experiments import BASE_MODEL
from revlens.objectives import OBJECTIVES

DEFAULT_ATTENTION = {"mdm": "bidirectional", "bert": "bidirectional", "arm": "causal", "inplace": "bidirectional"}


# every numeric option goes through revlens.config.number_option: finite, in range, refused before any work
_positive_int = number_option(int, 1)
_positive_float = number_option(float, 0, strict=True)
_seed = number_option(int, 0, MAX_SEED)  # what torch.manual_seed and torch.Generator accept


def _device(text: str) -> str:
    """A torch device this machine has, checked while the arguments are read (not when weights are loaded)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"CUDA requested ({text!r}) but not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"MPS requested ({text!r}) but not available on this machine; use --device cpu")
    return text


def _file_path(text: str) -> Path:
    """An output file path; an existing folder there is refused now, not after the work that would fill the file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give the path of a file to write")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train one toy model and write a checkpoint + metrics.json")
    tr.add_argument("--objective", choices=OBJECTIVES, default="mdm")
    tr.add_argument("--attention", choices=ATTENTION_DIRS, default=None,
                    help="attention direction (default: causal for arm, bidirectional otherwise)")
    tr.add_argument("--positional", choices=POSITIONALS, default=BASE_MODEL["positional"])
    tr.add_argument("--heads", type=_positive_int, default=BASE_MODEL["n_heads"])
    tr.add_argument("--d-model", type=_positive_int, default=BASE_MODEL["d_model"])
    tr.add_argument("--layers", type=_positive_int, default=BASE_MODEL["n_layers"])
    tr.add_argument("--seed", type=_seed, default=0)
    tr.add_argument("--steps", type=_positive_int, default=2000)
    tr.add_argument("--batch-size", type=_positive_int, default=256)
    tr.add_argument("--lr", type=_positive_float, default=3e-3)
    tr.add_argument("--n-facts", type=number_option(int, 2), default=200, help="world size (number of facts)")
    tr.add_argument("--n-control", type=_positive_int, default=40, help="facts also trained in reverse")
    tr.add_argument("--world-seed", type=_seed, default=0)
    tr.add_argument("--world", type=Path, default=None, help="load the world from this JSON file instead")
    tr.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint")
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="recompute the metrics of a checkpoint folder")
    ev.add_argument("checkpoint", type=Path)

    sw = sub.add_parser("sweep", help="run a grid of settings x seeds into one tidy JSON-lines table (resumable)")
    sw.add_argument("config", type=Path, help="sweep file, e.g. data/ablations_sweep.json")
    sw.add_argument("--out", type=_file_path, default=None, help="table path (default: reports/sweep_<name>.jsonl)")
    sw.add_argument("--jobs", type=_positive_int, default=2,
                    help="settings (routing sweeps: stacks) trained at once in worker processes, threads split between them (default 2)")
    sw.add_argument("--redo", action="store_true",
                    help="drop and retrain rows of --out that this sweep file and library did not produce "
                         "(a resume refuses them otherwise)")

    sp = sub.add_parser("small-pair", help="train the small LLaDA-architecture MDM and matched ARM notebook 05 uses")
    sp.add_argument("--out", type=Path, default=None, help="output folder (default: data/small_pair)")
    sp.add_argument("--steps", type=_positive_int, default=None, help="training steps per model")
    sp.add_argument("--switch-seeds", type=_positive_int, default=None,
                    help="also train, into --runs, the trainer switches' MDMs and ARMs for seeds 0..N-1 and the "
                         "pair's MDM recipe for the other seeds of 0..N-1, and write switches.jsonl, heads.jsonl and "
                         "replicate_seed<k>.json (everything notebook 05 ships)")
    sp.add_argument("--runs", type=Path, default=Path("runs/small_pair_switches"), help="folder for the switch runs")
    sp.add_argument("--models", nargs="+", choices=("llada", "llama"), default=("llada", "llama"),
                    help="train only these of the pair (llada: the MDM, llama: the ARM)")
    sp.add_argument("--seed", type=_seed, default=None, help="seed of the pair (world, initialisation, batches; default 0)")
    sp.add_argument("--lr", type=_positive_float, default=None,
                    help="peak learning rate of the pair's one-cycle schedule (default: the shipped recipe's)")
    sp.add_argument("--curve-every", type=_positive_int, default=None,
                    help="score the pair every N training steps and keep the accuracy curve in training.json")
    sp.add_argument("--arm-curve-every", type=_positive_int, default=None, help="the ARM's interval (default: --curve-every)")
    sp.add_argument("--jobs", type=_positive_int, default=2,
                    help="switch runs trained at once in worker processes, threads split between them (default 2)")
    sp.add_argument("--overwrite", action="store_true",
                    help="write into a --out that holds no small pair, and remove the files there that would "
                         "describe another pair (the other model, switches.jsonl, heads.jsonl, replicate_seed*.json)")

    fa = sub.add_parser("facts", help="score a model folder (LLaDA, Dream, Qwen2, LLaMA) on a fact set, both directions")
    fa.add_argument("model", help="local folder with config.json + safetensors (or a hub name when online)")
    fa.add_argument("--facts", type=Path, default=Path("data/real_facts.json"))
    fa.add_argument("--device", type=_device, default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    fa.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="cast the stored weights (default: keep them)")
    fa.add_argument("--rule", choices=("startswith", "exact", "substring"), default="startswith")
    fa.add_argument("--decode", choices=("sequential", "parallel"), default="sequential",
                    help="how a masked model fills the answer: one token per pass, most confident first "
                         "(sequential), or all in one pass (parallel, for models trained with whole-entity masking)")
    fa.add_argument("--out", type=_file_path, default=None, help="also write every scored query as JSON lines")

    tx = sub.add_parser("text-reversal", help="train a small MDM and a matched ARM on a reversal dataset folder "
                        "(Berglund et al. layout) and score every test file")
    tx.add_argument("data", type=Path, help="folder with p2d_/d2p_/both_prompts_train.jsonl and the test files")
    tx.add_argument("--out", type=Path, required=True,
                    help="run folder: results.csv, scores.jsonl, checkpoints (a killed run resumes when rerun)")
    tx.add_argument("--layers", type=_positive_int, default=2)
    tx.add_argument("--d-model", type=_positive_int, default=128)
    tx.add_argument("--heads", type=_positive_int, default=4)
    tx.add_argument("--seed", type=_seed, default=0, help="seed of a one-seed run (see --seeds)")
    tx.add_argument("--seeds", type=_seed, nargs="+", default=None,
                    help="train both models at each of these seeds into one run folder (e.g. 0 1 2; overrides --seed)")
    tx.add_argument("--masking", choices=("token", "entity"), default="token",
                    help="MDM masking: each token independently, or the completion as one span (entity)")
    tx.add_argument("--models", nargs="+", choices=("llada", "llama"), default=["llada", "llama"],
                    help="train both (default, with each also at the other's step count), or the MDM alone, e.g. for "
                         "another --masking when the ARM, which masking does not touch, is trained already")
    tx.add_argument("--max-steps", type=_positive_int, default=40000, help="cap on steps per model")
    tx.add_argument("--min-steps", type=number_option(int, 0), default=2000, help="no model stops before this step")
    tx.add_argument("--eval-every", type=_positive_int, default=250,
                    help="steps between evaluations on the held-out training paraphrases")
    tx.add_argument("--patience", type=_positive_int, default=4,
                    help="stop after this many evaluations without a better held-out accuracy")
    tx.add_argument("--overwrite", action="store_true",
                    help="replace --out as a whole when it holds another run or other content (refused otherwise), "
                         "and discard an interrupted run instead of resuming it")

    rp = sub.add_parser("reproduce", help="run the whole notebook suite headless into reports/")
    rp.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    rp.add_argument("--out", type=Path, default=Path("reports"))
    rp.add_argument("--timeout", type=number_option(int, 0, strict=True), default=None, metavar="SECONDS",
                    help="stop a notebook whose cell runs longer than this (default: no limit; a slow machine "
                         "only takes longer)")
    rp.add_argument("--fresh", action="store_true",
                    help="execute every notebook, even those that finished unchanged in an earlier run into --out "
                         "(by default a rerun resumes after them)")
    return parser


def _print_metrics(metrics: dict[str, float]) -> None:
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}, indent=1))


def cmd_train(args: argparse.Namespace) -> int:
    from revlens import training
    from revlens.checkpoint import check_destination, save_run
    from revlens.world import ReversalWorld

    check_destination(args.out)  # an unusable --out fails now, not after training
    world = ReversalWorld.load(args.world) if args.world else ReversalWorld.generate(args.n_facts, args.n_control, args.world_seed)
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    cfg = EncoderConfig(
        d_vocab=world.d_vocab,
        d_model=args.d_model,
        n_heads=args.heads,
        d_head=args.d_model // args.heads,
        n_layers=args.layers,
        attention_dir=args.attention or DEFAULT_ATTENTION[args.objective],
        positional=args.positional,
    )
    train_cfg = training.TrainConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    (run,) = training.train(cfg, world, train_cfg, seeds=(args.seed,), progress=not args.no_progress)
    save_run(run, world, args.out)
    _print_metrics(run.metrics)
    print(f"checkpoint written to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from revlens.checkpoint import load_run
    from revlens.evaluation import evaluate

    run, world = load_run(args.checkpoint)
    _print_metrics(evaluate(run.model, world, run.train_cfg.objective))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from revlens.config import load_json
    from revlens.sweep import SweepSpec, run_sweep

    data = load_json(args.config)
    if isinstance(data, dict) and data.get("family") == "routing":  # the routing world (revlens.routing): a stack per cell
        from revlens.routing.sweep import RoutingSweepSpec, run_routing_sweep

        try:
            routing = RoutingSweepSpec.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{args.config}: {err}") from None
        out = run_routing_sweep(routing, args.out or Path("reports") / f"sweep_{routing.name}.jsonl", jobs=args.jobs,
                                redo=args.redo)
        print(f"table written to {out}")
        return 0
    spec = SweepSpec.load(args.config)
    out = run_sweep(spec, args.out or Path("reports") / f"sweep_{spec.name}.jsonl", jobs=args.jobs, redo=args.redo)
    print(f"table written to {out}")
    return 0


def cmd_small_pair(args: argparse.Namespace) -> int:
    import dataclasses

    from revlens.lm.small_pair import SHIPPED_PAIR, SMALL_PAIR_DIR, SWITCH_BASE, regenerate, train_small_pair

    pc, switch_base = SHIPPED_PAIR, SWITCH_BASE
    if args.steps is not None:
        pc, switch_base = (dataclasses.replace(c, steps=args.steps, arm_steps=None) for c in (pc, switch_base))
    if args.seed is not None:
        pc = dataclasses.replace(pc, seed=args.seed)
    if args.lr is not None:
        pc = dataclasses.replace(pc, lr=args.lr)
    if args.switch_seeds and set(args.models) != {"llada", "llama"}:
        print("--switch-seeds regenerates everything notebook 05 ships: both models of the pair, not --models",
              file=sys.stderr)
        return 2
    if args.switch_seeds:
        out = regenerate(args.out or SMALL_PAIR_DIR, args.runs, tuple(range(args.switch_seeds)), pc, switch_base, args.jobs,
                         args.curve_every or 0, args.arm_curve_every, args.overwrite)
    else:
        out = train_small_pair(args.out or SMALL_PAIR_DIR, pc, tuple(args.models), args.curve_every or 0,
                               args.arm_curve_every, args.overwrite)
    print(f"small pair written to {out}")
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    import torch

    from revlens.facts import FactSet
    from revlens.lm import HookedLM
    from revlens.lm.analysis import score_table

    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = HookedLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    facts = FactSet.load(args.facts)
    table = score_table(lm, facts, ("forward", "reverse"), rule=args.rule, decode=args.decode)
    print(lm)
    print(f"rule: {args.rule}, decode: {args.decode} (answer length = gold token count; see revlens.facts)")
    print(table.groupby(["relation", "direction"])[["correct", "logp"]].mean().unstack("direction").round(3).to_string())
    if args.out:
        from revlens.atomic import write_text_atomic

        write_text_atomic(args.out, table.to_json(orient="records", lines=True))
        print(f"rows written to {args.out}")
    return 0


def cmd_text_reversal(args: argparse.Namespace) -> int:
    from revlens.lm.trainer import PairConfig
    from revlens.lm.text_reversal import CONVERGED_ACCURACY, HarnessConfig, not_converged, run_text_reversal

    pair = PairConfig(steps=0, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                      mlp_hidden_size=3 * args.d_model, masking=args.masking)
    seeds = tuple(args.seeds) if args.seeds else (args.seed,)
    hc = HarnessConfig(pair=pair, seeds=seeds, max_steps=args.max_steps, min_steps=args.min_steps,
                       eval_every=args.eval_every, patience=args.patience,
                       models=tuple(m for m in ("llada", "llama") if m in args.models))
    results = run_text_reversal(args.data, args.out, hc, args.overwrite)
    table = results.pivot_table(index=["file", "model", "seed"], columns="metric", values="value", sort=False)
    print(table.round(3).to_string())
    print(f"rule: startswith after normalisation (see revlens.lm.text_reversal); run written to {args.out}")
    failed = not_converged(results)
    print(f"not converged: {'; '.join(failed)}" if failed else
          f"every model converged (held-out trained-direction accuracy >= {CONVERGED_ACCURACY})")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from revlens.reports import notebook_paths, run_suite

    summary = run_suite(notebook_paths(args.notebooks), args.out, timeout=args.timeout, fresh=args.fresh)
    print(f"done: {summary}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one plain line on stderr (a user of the command needs the message, not our source line)."""
    print(f"revlens: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "small-pair": cmd_small_pair,
               "facts": cmd_facts, "text-reversal": cmd_text_reversal, "reproduce": cmd_reproduce}[
        args.command
    ]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"revlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
