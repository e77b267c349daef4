"""The `slimtune` command: `info`, `demo`, `train` and `bench`.

Subcommand modules are imported only when run, so `slimtune --help` and `slimtune info` stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from .shipped import shipped_recipes

APPS_MODULES = ("tqdm", "yaml", "matplotlib", "peft")  # the `apps` extra (pyproject.toml)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def _device(text: str):
    """A torch.device that exists here, so a typo or a missing GPU is a usage error, not a traceback."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try 'cpu' or 'cuda')") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but torch sees no CUDA device")
    return device


def _method_list(text: str) -> list[str]:
    from .bench import METHODS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}"
        )
    return names


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Sparse and partial fine-tuning of Hugging Face models with custom kernels.",
    )
    from slimtune import __version__

    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("info", help="versions, extension build and the backend each op uses, with reasons")

    demo = sub.add_parser(
        "demo",
        help="teach the built-in pretrained model a new task with each method; what each keeps of the rest",
        description="Teach the built-in SmolLM2-135M-Instruct a new task with full fine-tuning, LoRA, PaCA, "
        "S2FT and HFT, each from the same base at the learning rate the quality benchmark found best; print "
        "the new task's accuracy, the share of general questions still answered, the NLL drift on English "
        "prose, ms per step and memory, and save the heatmap and loss curves. With --single-task: a small "
        "random-init model, PaCA vs full fine-tuning vs PEFT LoRA, each in a fresh process (final loss, ms "
        "per step, peak memory).",
    )
    demo.add_argument(
        "--single-task",
        action="store_true",
        help="the single-task comparison of PaCA, full fine-tuning and PEFT LoRA instead",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps per method (default 16; 200 with --single-task)",
    )
    demo.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the model, data and PaCA columns")
    demo.add_argument(
        "--output",
        default=None,
        help="folder for the recipe and its run, new or empty (default: a new temporary folder, kept so its "
        "checkpoints and plots can be read; about 1 GB)",
    )

    train = sub.add_parser(
        "train",
        help="run a multi-stage fine-tuning recipe and measure forgetting after every stage",
        description="Train the stages of a YAML recipe in order, evaluate every task after each, and write "
        "checkpoints, the forgetting matrix, plots and logs to the run folder (see docs/trainer.md). "
        "Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.",
    )
    train.add_argument(
        "recipe",
        help="recipe file, or the name of a recipe shipped with slimtune: "
        f"{', '.join(shipped_recipes())} (the files of slimtune/recipes)",
    )
    train.add_argument("--output", default=None, help="run folder (default runs/<recipe name>)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in the folder after its last finished stage"
    )
    train.add_argument(
        "--changed-data",
        action="store_true",
        help="with --resume: go on although a data file changed since the run started (refused otherwise)",
    )
    train.add_argument(
        "--export-hf",
        action="store_true",
        help="also write the final model of each branch to RUN/export/STAGE as a plain Hugging Face "
        "directory (save_pretrained of the merged model, with its tokenizer)",
    )

    train.add_argument(
        "--report-to",
        choices=("none", "tensorboard"),
        default=None,
        help="where the step figures go besides train.log and each stage's steps.csv (default: the "
        "recipe's `log`; tensorboard: event files in RUN/tensorboard, needs the tensorboard extra)",
    )

    profile = sub.add_parser(
        "profile",
        help="memory, FLOPs, bytes and step time of every method: accounted without a GPU, measured with one",
        description="Account each method's training step on the meta device (exact bytes of weights, "
        "trainable parameters, gradients, optimizer state and tensors saved for backward, by module kind; "
        "the peak; FLOPs; bytes moved; a step time modelled from the card's published peaks, labelled as a "
        "model). With --device cuda (or cpu) the measured times (and CUDA peak memory) stand beside them. "
        "Writes profile.md, profile.csv, report.json and profile.png to --out.",
    )
    profile.add_argument(
        "--model", default="tinyllama-1.1b", help="preset (tinyllama-1.1b, tiny), model dir or config.json"
    )
    profile.add_argument("--batch", type=_positive_int, default=8, help="sequences per step (default 8)")
    profile.add_argument("--seq", type=_positive_int, default=2048, help="tokens per sequence (default 2048)")
    profile.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    profile.add_argument(
        "--methods",
        default="floor,paca,s2ft,lora,hydra,peft-lora,peft-lora-bf16,full",
        help="comma list of bench rows (default: floor,paca,s2ft,lora,hydra,peft-lora,peft-lora-bf16,full)",
    )
    profile.add_argument(
        "--device",
        dest="profile_device",
        choices=["meta", "cpu", "cuda"],
        default=None,
        help="meta: accounting only (the default without a GPU); cpu or cuda: also measure",
    )
    profile.add_argument(
        "--card", choices=["a100", "h100", "h200"], default="h200", help="card of the time model"
    )
    profile.add_argument(
        "--out", default=None, help="output folder (default profiles/<model>-<B>x<T>-<dtype>)"
    )
    profile.add_argument(
        "--paca-r", type=_positive_int, default=64, help="PaCA columns per linear (default 64)"
    )
    profile.add_argument(
        "--lora-r", type=_positive_int, default=16, help="LoRA rank, alpha = 2r (default 16)"
    )
    profile.add_argument(
        "--lean-recompute",
        type=_fraction,
        default=0.0,
        help="the +lean rows: fraction of gated MLPs that recompute their up projection in backward "
        "(slimtune.lean(model, recompute=F); default 0)",
    )
    profile.add_argument(
        "--world-size",
        type=_positive_int,
        default=1,
        help="also show what each of N FSDP2 processes holds (shards exact, the peak a model)",
    )
    profile.add_argument(
        "--quant",
        default="none",
        help="4-bit base: every linear but the LM head as bitsandbytes Linear4bit, as BitsAndBytesConfig("
        "load_in_4bit=True) loads it: nf4 (with double quantization, QLoRA's setting), nf4-single, fp4 "
        "(default none); rows: floor, paca (QPaCA), lora (QLoRA), hydra (QHydra), peft-lora, and +lean "
        "variants",
    )
    profile.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed steps on a device")
    profile.add_argument(
        "--steps", type=_positive_int, default=10, help="timed steps on a device (default 10)"
    )
    profile.add_argument(
        "--checkpointing",
        default="off",
        help="comma list of HF gradient checkpointing modes, a row per method and mode: off, reentrant, "
        "non-reentrant (default off)",
    )
    profile.add_argument("--trace", action="store_true", help="a torch.profiler trace per method (cpu/cuda)")
    profile.add_argument("--memory-snapshot", action="store_true", help="a CUDA memory snapshot per method")
    profile.add_argument(
        "--longest",
        type=float,
        default=None,
        metavar="GIB",
        help="instead: the longest sequence at batch 1 whose accounted peak fits GIB, per method",
    )

    bench = sub.add_parser(
        "bench",
        help="time one training step per method (the protocol of "
        "benchmarks/results/anchors-h200-2026-11-26.md) and write a report",
        description="End-to-end step benchmark: fresh random-init model per method, median step time and "
        "peak CUDA memory, each shown as a ratio to the floor. Writes .md and .json under --out.",
    )
    bench.add_argument(
        "--model",
        default=None,
        help="preset (tinyllama-1.1b, tiny), model directory or config.json; random init "
        "(default: tinyllama-1.1b on CUDA, tiny on CPU)",
    )
    bench.add_argument("--batch", type=_positive_int, default=None, help="sequences per step (default 8 / 2)")
    bench.add_argument(
        "--seq", type=_positive_int, default=None, help="tokens per sequence (default 2048 / 64)"
    )
    bench.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="model dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    bench.add_argument(
        "--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)"
    )
    bench.add_argument("--grad-checkpointing", action="store_true", help="enable HF gradient checkpointing")
    bench.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        help="comma list of rows: floor, every registered method (`slimtune info` lists them; in-place "
        "ones also as NAME-partial-adamw), peft-lora, peft-lora-bf16, full "
        "(default: floor,paca,peft-lora,full)",
    )
    bench.add_argument(
        "--paca-r", type=_positive_int, default=64, help="PaCA columns per linear (default 64)"
    )
    bench.add_argument("--lora-r", type=_positive_int, default=16, help="LoRA rank, alpha = 2r (default 16)")
    bench.add_argument(
        "--optimizer",
        choices=["adamw-fused", "partial-adamw"],
        default="adamw-fused",
        help="optimizer of the 'paca' method (default adamw-fused, as in the anchors)",
    )
    bench.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed steps first (default 3)")
    bench.add_argument(
        "--steps", type=_positive_int, default=10, help="timed steps; median reported (default 10)"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed for the model, batch and PaCA columns")
    bench.add_argument(
        "--out", default="benchmarks/results", help="report folder (default benchmarks/results)"
    )
    return parser


def _check_demo_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The demo's --output before anything loads: only for the pretrained demo, a new or empty folder."""
    if args.command != "demo" or args.output is None:
        return
    if args.single_task:
        parser.error("--output: the single-task demo writes no files (drop --output or --single-task)")
    folder = Path(args.output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        parser.error(f"--output {folder}: not an empty folder; name a new or empty one")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_demo_output(parser, args)
    missing = [name for name in APPS_MODULES if importlib.util.find_spec(name) is None]
    if args.command != "info" and missing:
        print(
            f"slimtune {args.command}: the commands need the apps extra ({', '.join(missing)} missing): "
            f"pip install 'slimtune[apps]'",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "device", "absent") is None:
        args.device = _default_device()
    try:
        if args.command == "info":
            import slimtune

            slimtune.info()
            return 0
        if args.command == "demo":
            if args.single_task:
                from . import single_task as demo
            else:
                from .train import demo
            args.steps = args.steps or (200 if args.single_task else 16)
            return demo.main(args)
        if args.command == "train":
            from .train import runner

            return runner.main(args)
        if args.command == "profile":
            from . import profile

            return profile.main(args)
        from . import bench

        return bench.main(args, shlex.join(["slimtune", *argv]))
    except KeyboardInterrupt:
        print("slimtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `slimtune info | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
