"""Multi-node training: 2 simulated nodes x 1 process (torchrun, c10d rendezvous on 127.0.0.1, CPU/gloo)
train the same weights as one node with 2 processes, and only global rank 0 writes the run's files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
RUN = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--epochs", "2", "--synthetic-num-train", "32",
       "--synthetic-num-val", "16", "--batch-size", "16", "--seed", "5", "--workers", "0", "--no-progress",
       "--device", "cpu"]
RUN_NAME = "cfqkbnc_acb_synthetic_s5_train"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*launcher_args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(REPO / "do_acnet.py")]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def weights(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {key: np.asarray(f[key]) for key in f}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-node 2-process run dir, 2-node run dir, the nodes' console outputs)."""
    root = tmp_path_factory.mktemp("multinode")
    single = subprocess.run(torchrun("--standalone", "--nproc-per-node=2") + RUN + ["--output-dir", str(root / "one")],
                            cwd=root, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):
        launcher = ["--nnodes=2", f"--node-rank={node_rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={endpoint}", "--rdzv-id=test-multinode",
                    f"--rdzv-conf=is_host={int(node_rank == 0)}"]
        # each "node" has its own working directory: only global rank 0 may write into the output dir
        workdir = root / f"node{node_rank}"
        workdir.mkdir()
        nodes.append(subprocess.Popen(torchrun(*launcher) + RUN + ["--output-dir", str(root / "two")], cwd=workdir,
                                      env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    return root / "one" / RUN_NAME, root / "two" / RUN_NAME, outputs, root


def test_two_nodes_train_the_weights_of_one_node_with_two_processes(runs):
    one, two, _, _ = runs
    for name in ("init.hdf5", "finish.hdf5", "finish_deploy.hdf5"):
        a, b = weights(one / name), weights(two / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


def test_two_nodes_record_one_run_of_world_size_two(runs):
    one, two, outputs, root = runs
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["world_size"], summary["seed"]) == (2, 5)
    assert summary["deploy_top1"] == json.loads((one / "summary.json").read_text())["deploy_top1"]
    assert json.loads((two / "recipe.json").read_text())["batch_size_per_rank"] == 8
    log = (two / "log.txt").read_text()
    assert "global batch 16 over 2 rank(s)" in log and "weights identical on all 2 ranks" in log
    assert json.loads((two / "run_state.json").read_text())["state"] == "finished"  # recorded by rank 0
    # nothing but the run folder in the output dir, nothing in the nodes' working directories
    assert [p.name for p in (root / "two").iterdir()] == [RUN_NAME]
    assert not any((root / "node0").iterdir()) and not any((root / "node1").iterdir())


DDP_WARNINGS = ("`broadcast_buffers` is deprecated", "Grad strides do not match bucket view strides")


def test_ddp_warns_nothing_of_our_calls(runs, tmp_path):
    """No deprecation or stride warning from the engine's DDP: the nodes' outputs above, and a DBB run with
    channels_last (kernels (C, C, 1, 1) whose gradients come through the identity-based 1x1)."""
    _, _, outputs, _ = runs
    run = [*RUN, "--epochs", "1", "-b", "dbb", "--channels-last", "--output-dir", str(tmp_path)]
    result = subprocess.run(torchrun("--standalone", "--nproc-per-node=2") + run, cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for output in (*outputs, result.stderr):
        assert not [w for w in DDP_WARNINGS if w in output], output[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def test_an_output_dir_that_a_node_does_not_see_is_one_clear_error(tmp_path):
    """A relative --output-dir from different working directories: node 1 does not see node 0's folder."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):
        (tmp_path / f"node{node_rank}").mkdir()
        launcher = ["--nnodes=2", f"--node-rank={node_rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={endpoint}", f"--rdzv-conf=is_host={int(node_rank == 0)}", "--max-restarts=0"]
        nodes.append(subprocess.Popen(torchrun(*launcher) + RUN + ["--output-dir", "out"],
                                      cwd=tmp_path / f"node{node_rank}", env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    errors = [line for line in outputs[0].splitlines() if "do_acnet.py: error:" in line]
    assert errors and "rank(s) [1] do not see rank 0's out/" in errors[0] and "every node mounts" in errors[0]
    assert not (tmp_path / "node0" / "out").exists() and not list((tmp_path / "node0").iterdir())


IN_TURN_SCRIPT = """
import sys, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {repo!r})
from utils.engine.distributed import DistContext, in_turn

def worker(rank, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=3)
    ctx = DistContext(rank=rank, world_size=3, local_rank=(0, 1, 0)[rank], device="cpu")  # 2 nodes: {{0, 1}}, {{2}}
    for fail_rank in (-1, 2):
        def load():
            if rank == fail_rank:
                raise OSError("no data here")
            with open(f"{{folder}}/order{{fail_rank}}.txt", "a") as f:
                f.write(f"{{rank}}\\n")
            return rank * 10
        try:
            outcome = f"result {{in_turn(load, ctx, lambda ranks: RuntimeError(f'failed on {{ranks}}'))}}"
        except Exception as exc:
            outcome = f"raised {{type(exc).__name__}}: {{exc}}"
        sys.stdout.write(f"{{fail_rank}} rank {{rank}} {{outcome}}\\n")  # one write: lines of ranks never interleave
        sys.stdout.flush()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=3)
"""


def test_in_turn_runs_rank_0_then_each_node_then_the_rest(tmp_path):
    script = tmp_path / "in_turn.py"
    script.write_text(IN_TURN_SCRIPT.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, str(script), str(free_port()), str(tmp_path)],
                            env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if " rank " in line)
    # global rank 0, then node 1's local rank 0 (global rank 2), then the rest
    assert (tmp_path / "order-1.txt").read_text().split() == ["0", "2", "1"]
    assert lines[:3] == ["-1 rank 0 result 0", "-1 rank 1 result 10", "-1 rank 2 result 20"]
    # rank 2 fails in phase 2: it re-raises its error, the others stop there too, rank 1 never loads
    assert (tmp_path / "order2.txt").read_text().split() == ["0"]
    assert lines[3:] == ["2 rank 0 raised RuntimeError: failed on [2]", "2 rank 1 raised RuntimeError: failed on [2]",
                         "2 rank 2 raised OSError: no data here"]
