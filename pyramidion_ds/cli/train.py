"""pyramidion-train CONFIG [--section.key VALUE ...] [--deepspeed_config NAME|PATH.json]

Launched once per device by the DeepSpeed launcher, srun or mpirun (see launch/).
"""

from __future__ import annotations

import sys

from ..config import load_config, shipped_configs
from ..errors import UsageError
from .common import config_parser, run_main

PROG = "pyramidion-train"


def build_parser():
    parser = config_parser(PROG, "Train (pretrain or fine-tune) a Pyramidion model with DeepSpeed.")
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default=None,
        help="DeepSpeed JSON: a path, or a shipped name (ds_configs/NAME.json, e.g. zero3_bf16); "
        "same as --train.deepspeed_config",
    )
    parser.add_argument(
        "--init-from",
        "--init_from",
        dest="init_from",
        default=None,
        help="load weights only from a run dir or export dir; same as --train.init_from",
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        default=None,
        help="start fresh even if SAVE_DIR holds a checkpoint",
    )
    parser.add_argument(
        "--check-only",
        "--check_only",
        dest="check_only",
        action="store_true",
        help="check the config, vocabulary, DeepSpeed JSON, data splits, run dir and --init-from "
        "as the ranks would, write nothing and exit (0: fine, 2: bad input); the launch scripts "
        "run it before starting the ranks",
    )
    parser.add_argument(
        "--world-size",
        "--world_size",
        dest="world_size",
        type=int,
        default=1,
        metavar="N",
        help="with --check-only: the number of ranks the job will start (DeepSpeed's batch "
        "arithmetic depends on it; default 1)",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the DeepSpeed launcher; rank discovery reads the environment",
    )
    return parser


def parse(argv: list[str]):
    args, rest = build_parser().parse_known_args(argv)
    if args.list_configs:
        return args, None
    if args.config is None:
        raise UsageError(f"missing CONFIG: give a YAML path or a shipped config name ({', '.join(shipped_configs())})")
    overrides = list(rest)
    if args.deepspeed_config:
        overrides += ["--train.deepspeed_config", args.deepspeed_config]
    if args.init_from:
        overrides += ["--train.init_from", args.init_from]
    if args.resume is False:
        overrides += ["--train.resume", "false"]
    return args, load_config(args.config, overrides)


def main(argv: list[str] | None = None):
    def body():
        args, cfg = parse(sys.argv[1:] if argv is None else argv)
        if cfg is None:
            print("\n".join(f"{name}\t{path}" for name, path in shipped_configs().items()))
            return 0
        if args.check_only:
            from ..train import check_training

            return check_training(cfg, args.world_size)
        from ..distributed.env import end_rank
        from ..train import run_training

        end_rank(run_training(cfg))  # (os._exit once all is closed: see end_rank)

    run_main(PROG, body)


if __name__ == "__main__":
    main()
