"""do_acnet.py end to end on tiny format-faithful fake CIFAR-10 (CPU): training, files, conversion,
deploy check, skip-if-finished, the standalone tools, kill-and-continue bit identity, 2-rank DDP
through torchrun and torch.distributed.launch, and the clear errors."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import constructor
import do_acnet
from acnet import load_hdf5
from fakedata import write_fake_cifar10
from quickstart import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parent.parent
EVAL_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch (\d+) iter (\d+) val top1=(\d+\.\d+) "
                       r"top5=(\d+\.\d+) loss=(\d+\.\d+)$")
TINY = ["--epochs", "2", "--batch-size", "32", "--no-progress", "--print-freq", "2", "--no-download"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, num_train=64, num_test=32, seed=0)
    return root


def run_main(argv: list[str]) -> None:
    do_acnet.main([str(a) for a in argv])


def read_hdf5_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_hdf5(path)


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory) -> dict[str, Path]:
    """cfqkbnc trained 2 epochs with each block type (in-process, the real command line)."""
    out = tmp_path_factory.mktemp("exps")
    dirs = {}
    for block in ("base", "acb", "dbb", "orepa", "repvgg", "mobileone"):
        layout = ["--channels-last"] if block == "base" else []  # the CUDA default layout, exercised on CPU
        run_main(["-a", "cfqkbnc", "-b", block, "--data-dir", cifar_root, "--output-dir", out, *TINY, *layout])
        dirs[block] = out / f"cfqkbnc_{block}_train"
    return dirs


@pytest.mark.parametrize("block", ["base", "acb", "dbb", "orepa", "repvgg", "mobileone"])
def test_end_to_end_files_are_complete_and_consistent(trained, block):
    exp = trained[block]
    for name in ("log.txt", "recipe.json", "init.hdf5", "finish.hdf5", "finish_deploy.hdf5", "latest.pth",
                 "summary.json"):
        assert (exp / name).is_file(), name
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(exp.glob(".*.tmp"))  # no temp file left over from the atomic writes

    summary = json.loads((exp / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert (summary["arch"], summary["block_type"], summary["dataset"], summary["epochs"],
            summary["world_size"]) == ("cfqkbnc", block, "cifar10", 2, 1)
    assert abs(summary["deploy_top1"] - summary["train_top1"]) <= 0.01
    assert summary["deploy_top5"] == pytest.approx(summary["train_top5"], abs=0.01)
    assert summary["max_abs_logit_diff"] < 1e-3
    assert summary["train_images_per_sec"] > 0 and summary["wall_seconds"] > 0

    recipe = json.loads((exp / "recipe.json").read_text())
    assert recipe["epochs"] == 2 and recipe["batch_size"] == 32 and recipe["lr"] == 0.1
    assert recipe["torch_version"] == torch.__version__ and "do_acnet" in recipe["command_line"]
    assert recipe["block_kwargs"] == ({"gamma_init": pytest.approx(1 / 3)} if block == "acb" else {})

    # finish.hdf5: the training-time model, no DDP prefix; init differs from finish
    train_model = constructor.build_model("cfqkbnc", block)
    finish = read_hdf5_tensors(exp / "finish.hdf5")
    train_model.load_state_dict(finish, strict=True)
    assert not any(k.startswith("module.") for k in finish)
    init = read_hdf5_tensors(exp / "init.hdf5")
    assert set(init) == set(finish) and any(not torch.equal(init[k], finish[k]) for k in finish)

    # finish_deploy.hdf5 loads strictly into the base deploy model and has its parameter count
    deploy_model = constructor.build_model("cfqkbnc", "base", deploy=True)
    deploy_model.load_state_dict(read_hdf5_tensors(exp / "finish_deploy.hdf5"), strict=True)
    assert summary["params_deploy"] == sum(p.numel() for p in deploy_model.parameters())
    assert summary["params_train"] == sum(p.numel() for p in train_model.parameters())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(train_model.eval()(x), deploy_model.eval()(x), rtol=1e-4, atol=1e-4)

    # log.txt: one evaluation line per evaluated epoch, the last one matching the final evaluation
    lines = (exp / "log.txt").read_text().splitlines()
    evals = [EVAL_LINE.match(line) for line in lines if "top1=" in line]
    assert evals and all(evals)
    assert [(int(m[1]), int(m[2])) for m in evals] == [(1, 2), (2, 4)]  # 64 images / 32 = 2 iterations
    assert float(evals[-1][3]) == pytest.approx(summary["train_top1"], abs=1e-4)


def test_deploy_weights_of_every_block_type_share_one_structure(trained):
    shapes = {block: {k: tuple(v.shape) for k, v in read_hdf5_tensors(exp / "finish_deploy.hdf5").items()}
              for block, exp in trained.items()}
    assert shapes["acb"] == shapes["base"] == shapes["dbb"] == shapes["orepa"] == shapes["repvgg"] == shapes["mobileone"]


def test_finished_run_skips_training_and_redoes_the_post_training_steps(trained, cifar_root, capsys):
    exp = trained["acb"]
    finish_before = (exp / "finish.hdf5").read_bytes()
    (exp / "summary.json").unlink()
    (exp / "finish_deploy.hdf5").unlink()
    run_main(["-a", "cfqkbnc", "-b", "acb", "--data-dir", cifar_root, "--output-dir", exp.parent, *TINY])
    assert (exp / "finish.hdf5").read_bytes() == finish_before
    assert (exp / "finish_deploy.hdf5").is_file()
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["epochs"] == 2 and abs(summary["deploy_top1"] - summary["train_top1"]) <= 0.01
    assert "training skipped" in (exp / "log.txt").read_text()


def test_standalone_eval_and_convert(trained, cifar_root, tmp_path, capsys):
    exp = trained["acb"]
    summary = json.loads((exp / "summary.json").read_text())
    for weights in ("finish.hdf5", "finish_deploy.hdf5"):  # training-time and deploy form
        run_main(["-a", "cfqkbnc", "-b", "acb", "--data-dir", cifar_root, "--no-download", "--eval-only",
                  exp / weights])
        printed = capsys.readouterr().out
        top1 = float(re.search(r"top1=(\d+\.\d+)", printed)[1])
        assert top1 == pytest.approx(summary["train_top1"], abs=0.01), printed
    # a .pth copy with a DDP prefix loads too
    pth = tmp_path / "finish.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in read_hdf5_tensors(exp / "finish.hdf5").items()}}, pth)
    run_main(["-a", "cfqkbnc", "-b", "acb", "--data-dir", cifar_root, "--no-download", "--eval-only", pth])
    assert float(re.search(r"top1=(\d+\.\d+)", capsys.readouterr().out)[1]) == pytest.approx(summary["train_top1"],
                                                                                          abs=0.01)
    converted = tmp_path / "deploy.hdf5"
    run_main(["-a", "cfqkbnc", "-b", "acb", "--convert", exp / "finish.hdf5", converted])
    assert "max abs logit diff" in capsys.readouterr().out
    ours, engine = read_hdf5_tensors(converted), read_hdf5_tensors(exp / "finish_deploy.hdf5")
    assert set(ours) == set(engine) and all(torch.equal(ours[k], engine[k]) for k in ours)


def test_convert_keeps_the_weights_class_count(tmp_path, capsys):
    """--convert of sres18 weights trained on a 7-class ImageFolder set (not ImageNet's 1000)."""
    from acnet import save_hdf5

    torch.manual_seed(0)
    model = constructor.build_model("sres18", "acb", num_classes=7)
    src, dst = tmp_path / "finish.hdf5", tmp_path / "deploy.hdf5"
    save_hdf5(model.state_dict(), src)
    run_main(["-a", "sres18", "-b", "acb", "--convert", src, dst])
    assert "max abs logit diff" in capsys.readouterr().out
    assert read_hdf5_tensors(dst)["fc.weight"].shape == (7, 512)


# ------------------------------------------------------------------------------------------ errors
def expect_error(argv, capsys, status: int, *patterns: str) -> str:
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    return err


def test_bad_arguments_are_clear_and_write_nothing(tmp_path, capsys, cifar_root):
    out = tmp_path / "out"
    base = ["--data-dir", cifar_root, "--output-dir", out]
    expect_error(["-a", "resnet9000", *base], capsys, 2, r"invalid choice: 'resnet9000'", "src56")
    expect_error(["-a", "src56", "-b", "vgg", *base], capsys, 2, r"invalid choice: 'vgg'")
    expect_error(["-a", "src56", "--epochs", "0", *base], capsys, 2, r"epochs must be >= 1, got 0")
    expect_error(["-a", "src56", "--lr", "-0.1", *base], capsys, 2, r"lr must be > 0")
    expect_error(["-a", "cfqkbnc", "--dataset", "imagenet", *base], capsys, 2, r"32x32 inputs.*cifar10")
    expect_error(["-a", "cfqkbnc", "--synthetic-num-train", "10", *base], capsys, 2, r"only apply to --dataset synthetic")
    expect_error(["-a", "cfqkbnc", "--eval-only", tmp_path / "nope.hdf5", *base], capsys, 2, r"does not exist")
    expect_error(["-a", "cfqkbnc", "--sync-bn", *base, *TINY], capsys, 2, r"--sync-bn needs CUDA")
    assert not out.exists()


def test_missing_data_and_bad_checkpoints_are_clear(tmp_path, capsys, cifar_root):
    out = tmp_path / "out"
    expect_error(["-a", "cfqkbnc", "--data-dir", tmp_path / "no_cifar_here", "--output-dir", out, *TINY], capsys,
                 1, r"no_cifar_here")
    assert not out.exists()
    common = ["-a", "cfqkbnc", "-b", "acb", "--data-dir", cifar_root, "--output-dir", out, *TINY]
    expect_error([*common, "-c", "continue"], capsys, 1, r"no resumable state.*latest\.pth.*-c fs")
    exp = out / "cfqkbnc_acb_train"
    exp.mkdir(parents=True)
    (exp / "latest.pth").write_bytes(b"\x00garbage, as left by a disk failure")
    expect_error([*common, "-c", "continue"], capsys, 1, r"latest\.pth is unreadable or corrupt")
    assert (exp / "latest.pth").read_bytes() == b"\x00garbage, as left by a disk failure"
    assert sorted(p.name for p in exp.iterdir()) == ["latest.pth"]
    # a weights file for another arch: named keys, no traceback
    expect_error(["-a", "src56", "-b", "acb", "--convert", exp / "latest.pth", tmp_path / "d.hdf5"], capsys, 1,
                 r"latest\.pth")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys, cifar_root):
    out = tmp_path / "out"
    expect_error(["-a", "cfqkbnc", "-b", "base", "--data-dir", cifar_root, "--output-dir", out, *TINY, "--lr", "1e30"],
                 capsys, 1, r"non-finite \(NaN or inf\)", r"--lr")
    assert not (out / "cfqkbnc_base_train" / "finish.hdf5").exists()


# ------------------------------------------------------------------------------------------ subprocesses
def cli(args: list, **kwargs) -> list[str]:
    return [sys.executable, str(ROOT / "do_acnet.py"), *[str(a) for a in args]]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_killed_run_continues_to_a_bit_identical_finish(tmp_path, cifar_root):
    args = ["-a", "cfqkbnc", "-b", "acb", "--data-dir", cifar_root, "--epochs", "2", "--batch-size", "32",
            "--no-progress", "--no-download"]
    env = subprocess_env()
    reference = subprocess.Popen(cli([*args, "--output-dir", tmp_path / "ref"]), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = subprocess.Popen(cli([*args, "--output-dir", tmp_path / "killed"]), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exp = tmp_path / "killed" / "cfqkbnc_acb_train"
    deadline = time.monotonic() + 120
    while not (exp / "latest.pth").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (exp / "latest.pth").exists() and not (exp / "finish.hdf5").exists()
    resumed = subprocess.run(cli([*args, "--output-dir", tmp_path / "killed", "-c", "continue"]), cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait() == 0, reference.stderr.read().decode()[-3000:]
    ref = read_hdf5_tensors(tmp_path / "ref" / "cfqkbnc_acb_train" / "finish.hdf5")
    got = read_hdf5_tensors(exp / "finish.hdf5")
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit
    log = (exp / "log.txt").read_text()
    assert "continuing from latest.pth" in log

    def evaluations(text: str) -> list[str]:  # epoch, iteration and values of every evaluation line
        return [line.split(" ", 2)[2] for line in text.splitlines() if EVAL_LINE.match(line)]

    ref_log = (tmp_path / "ref" / "cfqkbnc_acb_train" / "log.txt").read_text()
    assert evaluations(log) == evaluations(ref_log)  # same values, no duplicate from the killed epoch
    assert len(evaluations(log)) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "launch"])
def test_two_rank_ddp_runs_to_the_end_with_identical_weights(tmp_path, cifar_root, launcher):
    module = "torch.distributed.run" if launcher == "torchrun" else "torch.distributed.launch"
    cmd = [sys.executable, "-m", module, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "do_acnet.py"), "-a", "cfqkbnc", "-b", "acb",
           "--data-dir", str(cifar_root), "--output-dir", str(tmp_path), "--epochs", "1", "--batch-size", "32",
           "--no-progress", "--no-download"]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / "cfqkbnc_acb_train"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert abs(summary["deploy_top1"] - summary["train_top1"]) <= 0.01
    log = (exp / "log.txt").read_text()
    assert "weights identical on all 2 ranks" in log
    # 64 images, global batch 32 over 2 ranks -> 2 iterations per epoch; eval covers all 32 test images
    assert "epoch 1 iter 2 val top1=" in log
    assert "on 32 images" in log
