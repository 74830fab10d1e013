"""Multi-node launch: two "nodes" of one process each on this machine train what one process trains.

Each node is its own launcher process, as on a cluster where every node runs the same command: ``torchrun``
with a c10d rendezvous (what docs/cluster/train_2nodes.sbatch runs), and ``accelerate launch`` with the
cluster's config file (docs/cluster/accelerate_2nodes_8gpus_bf16.yaml) and each node's machine rank. The
processes meet over gloo on 127.0.0.1, on the CPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tolerance
from test_training import make_disk_dataset, max_difference, metrics_of, tiny_overrides, weights_of

from dynvit import build_pipeline, load_recipe
from dynvit.training import checkpoint as ckpt

CLUSTER = Path(__file__).parents[1] / "docs" / "cluster"
# as in the two-process test: the same global batch (2 x 8 vs 1 x 16); RandAugment and random erasing stay on
# (each draw carries its own seed), mixup and drop path are off (their streams are per process)
COMMON = ["data.train_limit=32", "train.epochs=1", "train.mixup=0.0", "train.cutmix=0.0", "train.repeated_aug=1"]
COMMON += ["train.warmup_epochs=0", "train.lr_base_batch=null", "train.lr=1e-3"]
# every process on the CPU, one math thread each, no network
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
TRAIN = ["-m", "dynvit.cli", "train", "quickstart"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_disk_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The reference: one process, global batch 16, on the CPU whatever this machine has."""
    out = tmp_path_factory.mktemp("runs") / "one"
    command = [sys.executable, *TRAIN, *tiny_overrides(data, out, *COMMON, "train.batch_size=16")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_commands(launcher: str, port: int, overrides: list[str]) -> list[list[str]]:
    if launcher == "torchrun":
        torchrun = shutil.which("torchrun")
        assert torchrun is not None, "torch installs the torchrun command"
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dynvit-test"]
        launch = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", *rendezvous]
        return [[*launch, *TRAIN, *overrides] for _ in range(2)]
    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the accelerate command line is part of the install"
    launch = [accelerate, "launch", "--config_file", str(CLUSTER / "accelerate_2nodes_8gpus_bf16.yaml")]
    # the cluster file with what differs on a laptop: 2 processes in all, this host, a free port, float32
    launch += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return [[*launch, "--machine_rank", str(rank), *TRAIN, *overrides] for rank in range(2)]


def _run_nodes(commands: list[list[str]], logs: Path, timeout: float = 300) -> list[str]:
    """Start every node's launcher at once and wait for all; a node that fails or hangs stops the others."""
    files = [logs / f"node{rank}.log" for rank in range(len(commands))]
    nodes = []
    for command, file in zip(commands, files):
        with file.open("w") as out:  # the child keeps its own descriptor
            nodes.append(
                subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )
    deadline = time.monotonic() + timeout
    try:
        while any(node.poll() is None for node in nodes):
            if any(node.returncode for node in nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the launcher and its workers: their own process group
                node.wait()
    texts = [file.read_text() for file in files]
    for node, text in zip(nodes, texts):
        assert node.returncode == 0, text[-4000:]
    return texts


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_nodes_of_one_process_train_what_one_process_trains(launcher, data, one_process, tmp_path):
    two = tmp_path / "two"
    overrides = tiny_overrides(data, two, *COMMON, "train.batch_size=8")
    logs = _run_nodes(_node_commands(launcher, _free_port(), overrides), tmp_path)
    assert any("on 2 process(es)" in log for log in logs), logs[0][-2000:]

    meta = ckpt.read_meta(two / "checkpoints" / "last")
    assert meta["world_size"] == 2 and meta["global_batch"] == 16 and meta["step"] == 2
    digests = meta["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    trained = weights_of(two / "checkpoints" / "last")
    assert max_difference(trained, weights_of(one_process / "checkpoints" / "last")) <= tolerance()["atol"]
    assert metrics_of(two)[0]["val_acc"] == metrics_of(one_process)[0]["val_acc"]
    torch.manual_seed(0)
    assert max_difference(trained, build_pipeline(load_recipe(two / "recipe.yaml")).state_dict()) > 1e-3


# -- the SLURM batch script, with srun and scontrol played by two shell stubs ---------------------------------

SRUN = """#!/bin/bash
# srun with one task per node: run the command once per node, at once, with that node's SLURM_NODEID
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_the_sbatch_script_trains_on_two_nodes(data, one_process, tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN)
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # show hostnames: the first node
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    two = tmp_path / "two"
    env = {**ENV, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]"}
    env |= {"SLURM_JOB_ID": "1", "RECIPE": "quickstart", "DATA": str(data), "OUT": str(two), "GPUS_PER_NODE": "1"}
    env |= {"PER_GPU_BATCH": "8", "MAIN_PORT": str(_free_port())}
    script = CLUSTER / "train_2nodes.sbatch"
    overrides = tiny_overrides(data, two, *COMMON, "train.batch_size=8")
    done = subprocess.run(
        ["bash", str(script), *overrides], cwd=CLUSTER.parents[1], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout and "mixed precision bf16" in done.stdout, done.stdout[-2000:]

    meta = ckpt.read_meta(two / "checkpoints" / "last")
    assert meta["world_size"] == 2 and meta["global_batch"] == 16 and meta["step"] == 2
    assert len(set(meta["weights_sha256_per_rank"])) == 1
    # bfloat16 autocast (the config's) against the float32 reference: within the bfloat16 tolerance
    trained, reference = weights_of(two / "checkpoints" / "last"), weights_of(one_process / "checkpoints" / "last")
    assert max_difference(trained, reference) <= tolerance(torch.bfloat16)["atol"]
