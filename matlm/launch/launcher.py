"""Launching `matlm train` on more machines, through the engines users already have.

- TPU VM slices: `gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command=...`
  runs the same command on every worker; on TPU VMs `jax.distributed.initialize()` finds
  the other workers by itself, so every worker runs `matlm train --multihost` unchanged.
- GKE clusters: `xpk workload create --cluster=C --workload=W --tpu-type=T ...` (xpk builds
  an image from a base image plus the checkout given as --script-dir, as MaxText users do).
- N local processes: JAX processes on this machine joined over loopback (gloo collectives on
  CPU), the way the multi-host tests run; their output is prefixed [p0], [p1], ...

Commands are built as argument lists and printed with shlex quoting. No credential is read,
stored or printed: gcloud and xpk use the caller's own login (`gcloud auth login`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
REMOTE_DIR = "~/matlm"          # Where the checkout lives on each TPU VM worker.
REMOTE_ARCHIVE = "~/matlm-src.tar.gz"


class LaunchError(ValueError):
    """Bad launch input (one line naming the flag)."""


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What every process runs: `matlm train` with these gin files, model dir and bindings."""
    gin_files: tuple = ()
    model_dir: str = "runs/default"
    bindings: tuple = ()    # gin bindings, `Name = value`
    extra_flags: tuple = ()  # other train flags, e.g. --steps=100

    def train_args(self, multihost_flags: Sequence[str] = ("--multihost",)) -> list[str]:
        return ["train", *multihost_flags, *[f"--gin_file={f}" for f in self.gin_files],
                f"--model_dir={self.model_dir}", "--no_progress",
                *[binding_flag(b) for b in self.bindings], *self.extra_flags]


def binding_flag(binding: str) -> str:
    """`Name = value` (a gin binding) as the `--gin.Name=value` flag that gives it."""
    name, value = binding.split("=", 1)
    return f"--gin.{name.strip()}={value.strip()}"


def show(command: Sequence[str]) -> str:
    """A command as one shell line; `--flag=value` keeps the flag outside the quotes."""
    def one(arg: str) -> str:
        match = re.fullmatch(r"(--[\w.-]+=)(.*)", arg, re.DOTALL)
        return match[1] + _quote(match[2]) if match else _quote(arg)
    return " ".join(one(a) for a in command)


def _quote(text: str) -> str:
    """shlex.quote, but "..." for text holding single quotes (gin strings) and nothing the
    shell expands inside double quotes: readable, and the same words."""
    if "'" in text and not re.search(r'["$`\\!]', text):
        return f'"{text}"'
    return shlex.quote(text)


# --- TPU VM slices (gcloud). ----------------------------------------------------------------
def _gcloud(verb: str, tpu: str, zone: str, project: Optional[str], *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, tpu, f"--zone={zone}",
            *([f"--project={project}"] if project else []), *rest]


def _ssh_all(tpu: str, zone: str, project: Optional[str], remote: str) -> list[str]:
    return _gcloud("ssh", tpu, zone, project, "--worker=all", f"--command={remote}")


def extras_for(jobs: Sequence[TrainJob], accelerator: Optional[str] = "tpu") -> str:
    """The pip extras a worker installs: the accelerator's, and `gcs` when a job's model dir
    is on a bucket (the GCS clients), e.g. '".[tpu,gcs]"', or "." for none."""
    names = [*([accelerator] if accelerator else []),
             *(["gcs"] if any("://" in job.model_dir for job in jobs) else [])]
    return f'".[{",".join(names)}]"' if names else "."


def install_commands(tpu: str, zone: str, project: Optional[str], source: str,
                     package: str = '".[tpu]"') -> list[list[str]]:
    """How each worker gets matlm: `copy` (default) sends this checkout's committed HEAD
    (`git archive`; uncommitted edits are not sent) to every worker with `tpu-vm scp`;
    `git+URL[@REV]` clones URL on every worker; `none` assumes it is installed at ~/matlm.
    Either way the worker installs it editable with `package`'s extras (`extras_for`) into
    ~/matlm/.venv (editable: the gin files under configs/ resolve against the checkout)."""
    setup = (f"cd {REMOTE_DIR} && python3 -m venv .venv && "
             f".venv/bin/pip install -q -e {package}")
    if source == "none":
        return []
    if source == "copy":
        archive = "/tmp/matlm-src.tar.gz"
        return [["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={archive}",
                 "HEAD"],
                ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{tpu}:{REMOTE_ARCHIVE}",
                 f"--zone={zone}", *([f"--project={project}"] if project else []),
                 "--worker=all"],
                # Extracted over any earlier copy (never removed: runs/ may live there).
                _ssh_all(tpu, zone, project,
                         f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR} "
                         f"&& {setup}")]
    match = re.fullmatch(r"git\+(?P<url>[^@\s]+?)(@(?P<rev>[\w./-]+))?", source)
    if not match:
        raise LaunchError(f"--install={source!r}: expected copy, none or git+URL[@REV] "
                          "(e.g. git+https://github.com/ORG/matlm.git@v0.3)")
    # Cloned once, then fetched: a rerun updates the checkout in place.
    return [_ssh_all(tpu, zone, project,
                     f"(test -d {REMOTE_DIR}/.git || git clone -q {shlex.quote(match['url'])} "
                     f"{REMOTE_DIR}) && git -C {REMOTE_DIR} fetch -q {shlex.quote(match['url'])} "
                     f"{shlex.quote(match['rev'] or 'HEAD')} && git -C {REMOTE_DIR} checkout -q "
                     f"FETCH_HEAD && {setup}")]


def tpu_train_command(job: TrainJob, tpu: str, zone: str, project: Optional[str]) -> list[str]:
    """`matlm train --multihost ...` on every worker of the slice (the model dir must be
    storage every worker sees: gs://bucket/path, or NFS)."""
    remote = f"cd {REMOTE_DIR} && .venv/bin/matlm {show(job.train_args())}"
    return _ssh_all(tpu, zone, project, remote)


def tpu_commands(jobs: Sequence[TrainJob], tpu: str, zone: str, project: Optional[str] = None,
                 source: str = "copy") -> list[list[str]]:
    """Install once, then one train launch per job, in order."""
    check_name("--tpu", tpu)
    check_name("--zone", zone)
    return [*install_commands(tpu, zone, project, source, extras_for(jobs)),
            *[tpu_train_command(job, tpu, zone, project) for job in jobs]]


# --- GKE clusters (xpk). --------------------------------------------------------------------
def workload_name(model_dir: str) -> str:
    """A Kubernetes-safe workload name from the model dir (lowercase, [a-z0-9-], <= 40)."""
    name = re.sub(r"[^a-z0-9-]+", "-", Path(model_dir).name.lower()).strip("-")
    return ("matlm-" + name)[:40].rstrip("-") or "matlm"


def xpk_command(job: TrainJob, cluster: str, tpu_type: Optional[str] = None,
                device_type: Optional[str] = None, num_slices: int = 1,
                project: Optional[str] = None, zone: Optional[str] = None,
                base_docker_image: str = "python:3.11", docker_image: Optional[str] = None,
                workload: Optional[str] = None) -> list[str]:
    """`xpk workload create` for one train job. With --docker_image the image must hold matlm
    installed at its working dir; otherwise xpk builds one from --base_docker_image plus this
    checkout (--script-dir), and the command installs it (editable, `tpu` extra for TPUs)."""
    check_name("--cluster", cluster)
    if (tpu_type is None) == (device_type is None):
        raise LaunchError("--xpk needs exactly one of --tpu_type (e.g. v5litepod-256) or "
                          "--device_type (e.g. h100-80gb-8, v5p-128)")
    if num_slices < 1:
        raise LaunchError(f"--num_slices must be >= 1, got {num_slices}")
    accelerator = ([f"--tpu-type={tpu_type}"] if tpu_type else [f"--device-type={device_type}"])
    is_tpu = bool(tpu_type) or not re.match(r"^(h100|h200|a100|b200|l4|a3|a4)", device_type or "")
    package = extras_for([job], "tpu" if is_tpu else None)
    install = f"python3 -m pip install -q -e {package} && " if not docker_image else ""
    image = ([f"--docker-image={docker_image}"] if docker_image else
             [f"--base-docker-image={base_docker_image}", f"--script-dir={REPO_ROOT}"])
    return ["xpk", "workload", "create", f"--cluster={cluster}",
            f"--workload={workload or workload_name(job.model_dir)}",
            *([f"--project={project}"] if project else []), *([f"--zone={zone}"] if zone else []),
            *accelerator, f"--num-slices={num_slices}", *image,
            f"--command={install}matlm {show(job.train_args())}"]


def check_name(flag: str, value: Optional[str]) -> None:
    """Names that go into gcloud/xpk commands: no spaces or shell characters."""
    if not value or not re.fullmatch(r"[A-Za-z0-9][\w.:-]*", value):
        raise LaunchError(f"{flag}={value!r}: expected a name of letters, digits, - _ . :")


# --- N local processes. ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(job: TrainJob, num_processes: int, port: int) -> list[list[str]]:
    """One `matlm train --multihost` per process, joined through process 0 on loopback."""
    return [[sys.executable, "-m", "matlm.cli.main", *job.train_args(
        ["--multihost", f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={num_processes}", f"--process_id={i}"])]
        for i in range(num_processes)]


def local_env(devices_per_process: Optional[int], base: Optional[dict] = None) -> dict:
    """The processes' environment: CPU (unless JAX_PLATFORMS says otherwise) and, if given,
    K fake CPU devices each (XLA's host device count, replacing any earlier count)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices_per_process is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=" \
                           f"{devices_per_process}".strip()
    return env


def run_local(job: TrainJob, num_processes: int, devices_per_process: Optional[int] = None,
              out: TextIO = sys.stdout, timeout: Optional[float] = None) -> int:
    """Starts the processes, prefixes their output lines with [pI], waits for all of them.
    If one fails the others are stopped (they would wait for it in a collective forever).
    Returns 0, or the first non-zero exit code."""
    if num_processes < 1:
        raise LaunchError(f"--local_processes must be >= 1, got {num_processes}")
    port = free_port()
    env = local_env(devices_per_process)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, bufsize=1)
             for cmd in local_commands(job, num_processes, port)]
    lock = threading.Lock()

    def pump(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with lock:
                out.write(f"[p{i}] {line}")
                out.flush()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    code = 0
    try:
        pending = list(procs)
        while pending:
            for proc in list(pending):
                try:
                    rc = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(proc)
                if rc != 0 and code == 0:
                    code = rc
                    for other in pending:
                        other.terminate()
            if timeout is not None:
                timeout -= 0.5
                if timeout <= 0:
                    raise subprocess.TimeoutExpired(local_commands(job, 1, port)[0], 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join(timeout=5)
    return code
