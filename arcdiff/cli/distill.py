"""`arcdiff distill`: progressive distillation of a dual-head model into few-step students."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Progressive distillation (Salimans & Ho 2022) of a dual-head (x0_eps) model in its own
parameterisation x = cos(eta) x0 + sin(eta) eps. Round 1 teaches a student, a copy of the teacher,
to reach in ONE deterministic DDIM step of the N-step grid what the teacher reaches in TWO steps of
the 2N-step grid (N = TEACHER_STEPS / 2); every later round halves N again, with the previous
round's student as the teacher, down to FINAL_STEPS. The student's x0 target follows in closed form
from the teacher's two steps and its eps target from x = cos x0 + sin eps; the loss is the x0
error weighted by max(cot^2 eta, 1) plus the eps error, so the student keeps both heads.

After each round the student (EMA weights) is written as a model folder OUT/NAME-<N>step
(config.json + model.safetensors) whose config has a "distilled" object: the teacher, the step
count, the solver (ddim) and the grid to sample it with. Serve it by pointing ARCDIFF_MODEL_DIR at
a folder holding it; sample it with --solver ddim --steps N --schedule uniform.

Checkpoints go to OUT every --checkpoint-every steps and at every round's end; --resume continues
the run bit for bit (the settings that shape the run must be the same). --stop-after runs a chunk
of a long run and exits after a checkpoint; checkpoint.json says "done": true once every round is
finished. A run in chunks, each one a fresh process that resumes from the last checkpoint:
  while ! grep -qs '"done": true' OUT/checkpoint.json; do
    arcdiff distill ... --resume --stop-after 2000 --quiet || break
  done"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a dual-head model into 1-4 step students (progressive distillation)",
        description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    p.add_argument(
        "--teacher", required=True, help="the model to distil: a model folder, or a name in ARCDIFF_MODEL_DIR"
    )
    p.add_argument("--data", required=True, help="its training images: MNIST IDX file/folder, CIFAR-10 batches, images")
    p.add_argument("--out", required=True, help="run folder (checkpoints; the students are OUT/NAME-<N>step)")
    p.add_argument("--name", default="", help="students' base name (default: the teacher's name)")
    p.add_argument(
        "--teacher-steps",
        type=int,
        default=64,
        help="the teacher's DDIM steps the first round distils from (FINAL_STEPS x FIRST_SUBSTEPS x a power of 2; "
        "default 64)",
    )
    p.add_argument(
        "--first-substeps",
        type=int,
        default=2,
        help="teacher DDIM steps per student step in the first round (a power of 2; default 2, the paper's): 8 "
        "starts from a 64-step teacher with an 8-step student, skipping the rounds in between",
    )
    p.add_argument("--final-steps", type=int, default=1, help="the last round's student steps (default 1)")
    p.add_argument(
        "--schedule",
        choices=["uniform"],
        default="uniform",
        help="the time grid: uniform in eta (nested: grid_2N[2i] = grid_N[i]; the tuned grids are not)",
    )
    p.add_argument("--round-steps", type=int, default=4000, help="optimizer steps per round (default 4000)")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate after warm-up (default 1e-4)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps at the start of each round")
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="cosine",
        help="after warm-up, within each round: constant, or cosine decay to --lr-min-ratio * lr (default)",
    )
    p.add_argument("--lr-min-ratio", type=float, default=0.0, help="final lr / lr of a round with cosine (default 0)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the written students (default 0.999)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0: off (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches, noise and grid steps (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (default there: bf16 autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile teacher and student (GPU; slow start)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT")
    p.add_argument(
        "--stop-after", type=int, default=0, help="run at most this many steps, checkpoint and exit (0: to the end)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar: a line per checkpoint instead (for logs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from arcdiff.training.data import DataError
    from arcdiff.training.distill import DistillSettings, TrainingError, distill

    settings = DistillSettings(
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        name=args.name,
        teacher_steps=args.teacher_steps,
        first_substeps=args.first_substeps,
        final_steps=args.final_steps,
        schedule=args.schedule,
        round_steps=args.round_steps,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        lr_schedule=args.lr_schedule,
        lr_min_ratio=args.lr_min_ratio,
        ema=args.ema,
        grad_clip=args.grad_clip,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        amp=not args.no_amp,
        threads=args.threads,
        compile=args.compile,
    )
    try:
        folders = distill(
            settings, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after or None, log=True
        )
    except (DataError, TrainingError) as e:
        print(f"arcdiff distill: error: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"model written to {folder}")
    return 0
