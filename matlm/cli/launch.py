"""`matlm launch`: run `matlm train` on a TPU VM slice, a GKE cluster or N local processes.

    matlm launch --tpu=my-v5e-16 --zone=us-west4-a --dry_run --gin_file=configs/runs/c4_matlm_78m.gin \
        --model_dir=/mnt/nfs/runs/78m
    matlm launch --xpk --cluster=my-cluster --tpu_type=v5litepod-256 --gin_file=... --dry_run
    matlm launch --local_processes=2 --devices_per_process=2 --model_dir=runs/mh --gin.TrainConfig.steps=20

--dry_run prints the commands (gcloud / xpk) without running them. --local_processes runs
here and prefixes each process's output lines with [pI]. gin flags (--gin.X=V) are passed
to every process's `matlm train`. Reference: docs/launch.md.
"""
from __future__ import annotations

import subprocess
import sys

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

FLAG_CHECKS = {"local_processes": Check(int, ge=1), "devices_per_process": Check(int, ge=1),
               "num_slices": Check(int, ge=1), "steps": Check(int, ge=1),
               "stop_at": Check(int, ge=1)}


PARENTS = [
    flags.gin_files("gin file(s) of the train job (repeatable); default "
                    "configs/runs/default.gin; --gin.NAME=VALUE flags go to every process's "
                    "matlm train"),
    flags.model_dir(required=False, default="runs/default",
                    help="the run's model dir (on a slice: a path every worker sees)")]


def add_arguments(parser) -> None:
    job = parser.add_argument_group("the train job (as for matlm train)")
    job.add_argument("--steps", type=int, default=None)
    job.add_argument("--stop_at", type=int, default=None)
    job.add_argument("--skip_memory_check", action="store_true")
    where = parser.add_argument_group("where (exactly one)")
    where.add_argument("--tpu", default=None, help="TPU VM slice name (gcloud tpu-vm ssh)")
    where.add_argument("--xpk", action="store_true", help="a GKE cluster via `xpk workload create`")
    where.add_argument("--local_processes", type=int, default=None,
                       help="N JAX processes on this machine (gloo on loopback)")
    tpu = parser.add_argument_group("--tpu")
    tpu.add_argument("--zone", default=None, help="the slice's zone (also passed to xpk)")
    tpu.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    tpu.add_argument("--install", default="copy",
                     help="how workers get matlm: copy (this checkout's committed HEAD via "
                          "git archive + scp, default), git+URL[@REV] (clone on each "
                          "worker), none (already at ~/matlm)")
    xpk = parser.add_argument_group("--xpk")
    xpk.add_argument("--cluster", default=None)
    xpk.add_argument("--tpu_type", default=None, help="e.g. v5litepod-256, v5p-128")
    xpk.add_argument("--device_type", default=None, help="e.g. h100-80gb-8 (GPU node pools)")
    xpk.add_argument("--num_slices", type=int, default=1)
    xpk.add_argument("--workload", default=None, help="workload name (default from --model_dir)")
    xpk.add_argument("--docker_image", default=None,
                     help="an image with matlm installed (default: xpk builds one from "
                          "--base_docker_image and this checkout)")
    xpk.add_argument("--base_docker_image", default="python:3.11")
    local = parser.add_argument_group("--local_processes")
    local.add_argument("--devices_per_process", type=int, default=None,
                       help="fake CPU devices per process (XLA host device count)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands instead of running them")


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    from matlm.cli.train import DEFAULT_GIN
    from matlm.gin_config import resolve_gin_file
    from matlm.launch import launcher

    modes = [m for m, on in (("--tpu", args.tpu is not None), ("--xpk", args.xpk),
                             ("--local_processes", args.local_processes is not None)) if on]
    if len(modes) != 1:
        raise launcher.LaunchError(
            "give exactly one of --tpu=NAME, --xpk or --local_processes=N"
            + (f" (got {' and '.join(modes)})" if modes else ""))
    gin_files = args.gin_file or [DEFAULT_GIN]
    for path in gin_files:
        resolve_gin_file(path)  # A missing gin file is a one-line error before any launch.
    extra = [*([f"--steps={args.steps}"] if args.steps else []),
             *([f"--stop_at={args.stop_at}"] if args.stop_at else []),
             *(["--skip_memory_check"] if args.skip_memory_check else [])]
    job = launcher.TrainJob(gin_files=tuple(gin_files), model_dir=args.model_dir,
                            bindings=tuple(gin_bindings), extra_flags=tuple(extra))
    if args.local_processes is not None:
        if args.dry_run:
            env = launcher.local_env(args.devices_per_process)
            print(f"XLA_FLAGS={env.get('XLA_FLAGS', '')!r} JAX_PLATFORMS={env['JAX_PLATFORMS']}")
            for command in launcher.local_commands(job, args.local_processes, port=0):
                print(launcher.show(command).replace("127.0.0.1:0", "127.0.0.1:PORT"))
            return 0
        return launcher.run_local(job, args.local_processes, args.devices_per_process)
    if args.tpu is not None:
        if not args.zone:
            raise launcher.LaunchError("--tpu needs --zone (e.g. --zone=us-west4-a)")
        commands = launcher.tpu_commands([job], args.tpu, args.zone, args.project, args.install)
    else:
        commands = [launcher.xpk_command(
            job, args.cluster, tpu_type=args.tpu_type, device_type=args.device_type,
            num_slices=args.num_slices, project=args.project, zone=args.zone,
            base_docker_image=args.base_docker_image, docker_image=args.docker_image,
            workload=args.workload)]
    for command in commands:
        print(launcher.show(command), flush=True)
        if args.dry_run:
            continue
        code = subprocess.run(command).returncode
        if code != 0:
            print(f"matlm launch: exit {code} from: {launcher.show(command)}", file=sys.stderr)
            return code
    return 0
