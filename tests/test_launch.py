"""matlm launch: the gcloud / xpk commands printed by --dry_run, and bad input refused.
(`--local_processes=2` training equal to one process: tests/test_train_run.py
test_two_processes_train_together, which starts its processes with `matlm launch`.)"""
import re
import shlex

import pytest

from matlm.cli.main import main as matlm_main
from matlm.launch import launcher

REPO = str(launcher.REPO_ROOT)


def dry_run(capsys, *flags):
    assert matlm_main(["launch", "--dry_run", *flags]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_tpu_dry_run_copies_the_checkout_then_trains_on_every_worker(capsys):
    lines = dry_run(capsys, "--tpu=my-v5e-16", "--zone=us-west4-a", "--project=my-proj",
                    "--gin_file=configs/runs/c4_matlm_78m.gin", "--model_dir=/mnt/nfs/78m",
                    "--steps=100", "--gin.TrainConfig.decay='linear'")
    where = "--zone=us-west4-a --project=my-proj"
    assert lines == [
        f"git -C {REPO} archive --format=tar.gz --output=/tmp/matlm-src.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/matlm-src.tar.gz 'my-v5e-16:~/matlm-src.tar.gz' "
        f"{where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh my-v5e-16 {where} --worker=all --command='mkdir -p "
        "~/matlm && tar -xzf ~/matlm-src.tar.gz -C ~/matlm && cd ~/matlm && python3 -m venv "
        ".venv && .venv/bin/pip install -q -e \".[tpu]\"'",
        f"gcloud compute tpus tpu-vm ssh my-v5e-16 {where} --worker=all --command='cd ~/matlm "
        "&& .venv/bin/matlm train --multihost --gin_file=configs/runs/c4_matlm_78m.gin "
        "--model_dir=/mnt/nfs/78m --no_progress --gin.TrainConfig.decay=\"'\"'\"'linear'\"'\"'\" "
        "--steps=100'",
    ]
    # What each worker's shell runs, unquoted: the train command with the gin string intact.
    remote = shlex.split(lines[-1])[-1].split("=", 1)[1]
    assert shlex.split(remote)[3:] == [
        ".venv/bin/matlm", "train", "--multihost", "--gin_file=configs/runs/c4_matlm_78m.gin",
        "--model_dir=/mnt/nfs/78m", "--no_progress", "--gin.TrainConfig.decay='linear'",
        "--steps=100"]


def test_a_bucket_model_dir_installs_the_gcs_clients_on_the_workers(capsys):
    tpu = dry_run(capsys, "--tpu=t1", "--zone=europe-west4-b", "--install=git+https://x/m.git",
                  "--model_dir=gs://my-bucket/runs/78m")
    assert tpu[0].endswith('.venv/bin/pip install -q -e ".[tpu,gcs]"\'')
    assert "--model_dir=gs://my-bucket/runs/78m --no_progress" in tpu[1]
    xpk = dry_run(capsys, "--xpk", "--cluster=c", "--device_type=h100-80gb-8",
                  "--model_dir=gs://my-bucket/runs/78m")
    assert "--workload=matlm-78m" in xpk[0]
    assert "--command='python3 -m pip install -q -e \".[gcs]\" && matlm train" in xpk[0]


def test_tpu_install_from_a_git_url(capsys):
    lines = dry_run(capsys, "--tpu=t1", "--zone=europe-west4-b",
                    "--install=git+https://github.com/org/matlm.git@v0.3")
    assert len(lines) == 2
    assert lines[0] == (
        "gcloud compute tpus tpu-vm ssh t1 --zone=europe-west4-b --worker=all --command='(test "
        "-d ~/matlm/.git || git clone -q https://github.com/org/matlm.git ~/matlm) && git -C "
        "~/matlm fetch -q https://github.com/org/matlm.git v0.3 && git -C ~/matlm checkout -q "
        "FETCH_HEAD && cd ~/matlm && python3 -m venv .venv && .venv/bin/pip install -q -e "
        "\".[tpu]\"'")
    assert lines[1].endswith("--command='cd ~/matlm && .venv/bin/matlm train --multihost "
                             "--gin_file=configs/runs/default.gin --model_dir=runs/default "
                             "--no_progress'")


def test_xpk_dry_run(capsys):
    lines = dry_run(capsys, "--xpk", "--cluster=my-cluster", "--tpu_type=v5litepod-256",
                    "--num_slices=2", "--zone=us-west4-a", "--project=p",
                    "--gin_file=configs/runs/c4_matlm_78m.gin", "--model_dir=/mnt/nfs/Run_78M")
    assert lines == [
        "xpk workload create --cluster=my-cluster --workload=matlm-run-78m --project=p "
        "--zone=us-west4-a --tpu-type=v5litepod-256 --num-slices=2 "
        f"--base-docker-image=python:3.11 --script-dir={REPO} --command='python3 -m pip install "
        "-q -e \".[tpu]\" && matlm train --multihost --gin_file=configs/runs/c4_matlm_78m.gin "
        "--model_dir=/mnt/nfs/Run_78M --no_progress'"]
    gpu = dry_run(capsys, "--xpk", "--cluster=c", "--device_type=h100-80gb-8",
                  "--docker_image=gcr.io/p/matlm:1", "--workload=w1")
    assert gpu == ["xpk workload create --cluster=c --workload=w1 --device-type=h100-80gb-8 "
                   "--num-slices=1 --docker-image=gcr.io/p/matlm:1 --command='matlm train "
                   "--multihost --gin_file=configs/runs/default.gin --model_dir=runs/default "
                   "--no_progress'"]


def test_local_dry_run_lists_one_process_per_id(capsys):
    lines = dry_run(capsys, "--local_processes=3", "--devices_per_process=2", "--model_dir=r")
    assert lines[0] == "XLA_FLAGS='--xla_force_host_platform_device_count=2' JAX_PLATFORMS=cpu"
    for i, line in enumerate(lines[1:]):
        assert re.search(rf"matlm.cli.main train --multihost --coordinator_address=127.0.0.1:PORT "
                         rf"--num_processes=3 --process_id={i} ", line), line
    assert len(lines) == 4


@pytest.mark.parametrize("flags, message", [
    ([], "give exactly one of --tpu=NAME, --xpk or --local_processes=N"),
    (["--tpu=a", "--xpk"], "(got --tpu and --xpk)"),
    (["--tpu=a"], "--tpu needs --zone"),
    (["--tpu=a b", "--zone=z"], "--tpu='a b': expected a name"),
    (["--tpu=a", "--zone=z", "--install=svn://x"], "--install='svn://x': expected copy, none"),
    (["--xpk", "--cluster=c"], "--xpk needs exactly one of --tpu_type"),
    (["--local_processes=0"], "--local_processes must be an integer >= 1, got 0"),
    (["--tpu=a", "--zone=z", "--gin_file=nope.gin"], "gin file not found: 'nope.gin'"),
])
def test_bad_launch_input_is_one_line(capsys, flags, message):
    assert matlm_main(["launch", "--dry_run", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_sweep_on_tpu_emits_one_launch_per_trial(tmp_path, capsys):
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("grid: {TrainConfig.learning_rate: [1.0e-3, 3.0e-3]}\n")
    assert matlm_main(["sweep", f"--sweep={sweep}", "--launcher=tpu", "--tpu=t", "--zone=z",
                       "--install=none", "--base_dir=/mnt/nfs/sw", "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command='cd ~/matlm && "
        ".venv/bin/matlm train --multihost --gin_file=configs/runs/default.gin "
        f"--model_dir=/mnt/nfs/sw/learning_rate={lr} --no_progress "
        f"--gin.TrainConfig.learning_rate={lr}'" for lr in ("0.001", "0.003")]
