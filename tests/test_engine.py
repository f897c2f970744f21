"""Unit tests of the training engine's parts (utils/): schedule, parameter groups, metrics, RNG state,
resumable-state errors, log.txt, evaluation, and the Trainer on a tiny in-process model and loader."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from train_configs import get_recipe
from utils.rundir.checkpoint import (CheckpointError, ExperimentPaths, capture_rng_state, load_state, restore_rng_state,
                              save_state)
from utils.engine.trainer import NonFiniteLossError, Trainer, TrainOptions
from utils.engine.distributed import DistContext
from utils.engine.evaluation import compare_models, evaluate
from utils.engine.metrics import MetricSums, topk_correct
from utils.engine.optim import CosineWarmupSchedule, lr_factor, make_param_groups, make_sgd
from utils.rundir.log import RunLog, TensorBoard, eval_line

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- schedule
def test_cosine_factor_endpoints_and_midpoint():
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == pytest.approx(0.5)
    assert lr_factor(100, 100) == pytest.approx(0.0, abs=1e-12)


@given(total=st.integers(2, 500), warmup_frac=st.floats(0, 0.9))
def test_warmup_is_linear_then_cosine_decreases(total, warmup_frac):
    warmup = int(total * warmup_frac)
    factors = [lr_factor(t, total, warmup) for t in range(total + 1)]
    for t in range(warmup):
        assert factors[t] == pytest.approx(t / warmup)
    tail = factors[warmup:]
    assert tail[0] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:]))
    assert tail[-1] == pytest.approx(0.0, abs=1e-12)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_param_groups_bias_lr_doubled_and_weight_decay_everywhere():
    net = _tiny_net()
    groups = make_param_groups(net, lr=0.1, weight_decay=1e-4, bias_lr_factor=2.0)
    by_name = {g["name"]: g for g in groups}
    bias_ids = {id(net[1].bias), id(net[5].bias)}
    assert {id(p) for p in by_name["biases"]["params"]} == bias_ids
    assert id(net[1].weight) in {id(p) for p in by_name["weights"]["params"]}  # BN weight: plain lr, decayed
    assert by_name["biases"]["lr"] == pytest.approx(0.2)
    assert by_name["weights"]["weight_decay"] == by_name["biases"]["weight_decay"] == 1e-4
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in net.parameters())


def test_schedule_keeps_group_ratio_and_resumes_exactly():
    net = _tiny_net()
    opt = make_sgd(net, 0.1, 1e-4)
    sched = CosineWarmupSchedule(opt, total_iterations=20, warmup_iterations=4)
    assert sched.get_last_lr() == [0.0, 0.0]
    lrs = []
    for _ in range(20):
        sched.step()
        lrs.append(sched.get_last_lr())
    assert all(b == pytest.approx(2 * w) for w, b in lrs)
    assert lrs[3][0] == pytest.approx(0.1)
    # a fresh schedule loaded from the state at step 7 continues with the same values
    opt2 = make_sgd(_tiny_net(), 0.1, 1e-4)
    sched2 = CosineWarmupSchedule(opt2, total_iterations=20, warmup_iterations=4)
    replay = CosineWarmupSchedule(make_sgd(_tiny_net(), 0.1, 1e-4), 20, 4)
    for _ in range(7):
        replay.step()
    sched2.load_state_dict(replay.state_dict())
    assert sched2.get_last_lr() == lrs[6]
    with pytest.raises(ValueError, match="spans 20 iterations"):
        CosineWarmupSchedule(make_sgd(_tiny_net(), 0.1, 1e-4), 30).load_state_dict(replay.state_dict())


# ------------------------------------------------------------------------------------- metrics
@given(seed=st.integers(0, 10_000), num_classes=st.integers(2, 12), n=st.integers(1, 30))
def test_topk_correct_matches_brute_force(seed, num_classes, n):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g, dtype=torch.float64)
    target = torch.randint(0, num_classes, (n,), generator=g)
    got = topk_correct(logits, target, ks=(1, 5)).tolist()
    order = logits.argsort(dim=1, descending=True)
    for k, value in zip((1, 5), got):
        expected = sum(int(target[i] in order[i, :k]) for i in range(n))
        assert value == expected


def test_metric_sums_average_over_batches():
    sums = MetricSums(CPU)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    sums.update(torch.tensor(1.0), logits, torch.tensor([0, 2]))  # one top-1 hit
    sums.update(torch.tensor(4.0), logits[:1], torch.tensor([1]))  # miss
    out = sums.read()
    assert out["num_samples"] == 3
    assert out["loss"] == pytest.approx((1.0 * 2 + 4.0) / 3)
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(100.0)  # k capped at 3 classes


# ------------------------------------------------------------------------------------- RNG + state files
def test_rng_state_round_trip_all_generators(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    saved = capture_rng_state(CPU)
    save_state({"rng": saved}, tmp_path / "s.pth")
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "s.pth", weights_only=True)["rng"], CPU)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_load_state_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*-c fs"):
        load_state(tmp_path / "latest.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_state(corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a resumable state"):
        load_state(foreign)


# ------------------------------------------------------------------------------------- log.txt
EVAL_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch (\d+) iter (\d+) val top1=([\d.]+) top5=([\d.]+) "
                     r"loss=([\d.]+)$")


def test_runlog_eval_lines_are_the_only_top1_lines(tmp_path):
    log = RunLog(tmp_path / "log.txt")
    log.write("epoch 1 iter 10 train_loss=1.000000 train_acc1=50.0000")
    log.write_eval(5, 1955, {"top1": 93.21, "top5": 99.8, "loss": 0.2345})
    with pytest.raises(ValueError, match="top1="):
        log.write("deploy top1=1")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 2
    assert [line for line in lines if "top1=" in line] == [lines[1]]
    assert EVAL_RE.match(lines[1]).groups() == ("5", "1955", "93.2100", "99.8000", "0.234500")
    assert eval_line(5, 1955, {"top1": 93.21, "top5": 99.8, "loss": 0.2345}) in lines[1]
    reopened = RunLog(tmp_path / "log.txt", keep_existing=True)
    reopened.truncate(1)
    assert (tmp_path / "log.txt").read_text().splitlines() == lines[:1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]  # no temp file left behind


# ------------------------------------------------------------------------------------- evaluation
class ListLoader:
    """The loader protocol of the data package, over fixed in-memory batches."""

    def __init__(self, batches, num_classes=3):
        self.batches = batches
        self.num_classes = num_classes
        self.epoch_seen = []
        self.batch_size = batches[0][0].shape[0]
        self.num_samples = sum(b[0].shape[0] for b in batches)

    def set_epoch(self, epoch):
        self.epoch_seen.append(epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class PickPixel(nn.Module):
    """logits = the first 3 pixels of channel 0 (so the tests know the answer)."""

    def forward(self, x):
        return x[:, 0, 0, :3]


def test_evaluate_and_input_transform():
    images = torch.zeros(4, 1, 1, 3)
    images[0, 0, 0] = torch.tensor([3.0, 0, 0])  # predicts 0
    images[1, 0, 0] = torch.tensor([0, 3.0, 0])  # predicts 1
    images[2, 0, 0] = torch.tensor([0, 0, 3.0])  # predicts 2
    images[3, 0, 0] = torch.tensor([3.0, 0, 1.0])  # predicts 0
    labels = torch.tensor([0, 1, 0, 2])
    loader = ListLoader([(images[:2], labels[:2]), (images[2:], labels[2:])])
    out = evaluate(PickPixel(), loader, CPU)
    assert out["top1"] == pytest.approx(50.0) and out["num_samples"] == 4
    expected_loss = nn.functional.cross_entropy(images[:, 0, 0, :3], labels).item()
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    flipped = evaluate(PickPixel(), loader, CPU, input_transform=lambda x: x.flip(-1))
    # flipped rows: [0,0,3]->2 (wrong), [0,3,0]->1, [3,0,0]->0, [1,0,3]->2 (right)
    assert flipped["top1"] == pytest.approx(75.0)


def test_compare_models_reports_max_logit_difference():
    images = torch.randn(6, 1, 1, 3, generator=torch.Generator().manual_seed(0))
    loader = ListLoader([(images[:3], torch.tensor([0, 1, 2])), (images[3:], torch.tensor([2, 1, 0]))])

    class Shifted(PickPixel):
        def forward(self, x):
            return super().forward(x) + torch.tensor([0.0, 0.25, 0.0])

    out = compare_models(PickPixel(), Shifted(), loader, CPU)
    assert out["max_abs_logit_diff"] == pytest.approx(0.25)
    assert out["max_abs_logit"] == pytest.approx(images.abs().max().item())  # the reference's logits: the pixels
    same = compare_models(PickPixel(), PickPixel(), loader, CPU)
    assert same["max_abs_logit_diff"] == 0.0 and same["reference"] == same["candidate"]


# ------------------------------------------------------------------------------------- Trainer
def _learnable_batches(seed: int, n_batches: int = 4, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, 3, (batch,), generator=g)
        images = torch.randn(batch, 3, 8, 8, generator=g) * 0.3
        images[torch.arange(batch), labels] += 1.0  # class = brightest channel
        out.append((images, labels))
    return out


def _trainer(tmp_path: Path, epochs: int, lr: float = 0.1) -> tuple[Trainer, ListLoader]:
    torch.manual_seed(0)
    recipe = get_recipe("cfqkbnc", epochs=epochs, lr=lr, batch_size=16)
    loader = ListLoader(_learnable_batches(1))
    paths = ExperimentPaths(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=CPU)
    options = TrainOptions(print_freq=2, progress_bar=False, should_validate=lambda e: True)
    trainer = Trainer(_tiny_net(), loader, ListLoader(_learnable_batches(2)), recipe, ctx, paths,
                      RunLog(paths.log), options)
    return trainer, loader


class Killed(Exception):
    """Stands for the process being killed in the middle of an epoch."""


def test_trainer_writes_checkpoints_learns_and_resumes_bit_identically(tmp_path):
    from acnet import load_hdf5

    full, loader = _trainer(tmp_path / "full", epochs=3)
    result = full.fit(TensorBoard(tmp_path / "tb", enabled=False))
    assert loader.epoch_seen == [0, 1, 2]
    assert result.iteration == 12 and result.train_images == 3 * 64
    assert result.last_val["top1"] > 60.0  # learnable three-class problem
    for name in ("init.hdf5", "finish.hdf5", "latest.pth", "log.txt"):
        assert (tmp_path / "full" / name).is_file()
    finish = load_hdf5(tmp_path / "full" / "finish.hdf5")
    init = load_hdf5(tmp_path / "full" / "init.hdf5")
    assert set(finish) == set(full.model.state_dict())
    assert not torch.equal(finish["0.weight"], init["0.weight"])

    # killed in the middle of epoch 2 (after its first batch), then continued in a fresh trainer
    killed, killed_loader = _trainer(tmp_path / "part", epochs=3)

    class DyingLoader(ListLoader):
        def __iter__(self):
            if self.epoch_seen[-1] == 0:
                yield from self.batches
            else:
                yield self.batches[0]
                raise Killed

    killed.train_loader = DyingLoader(killed_loader.batches)
    with pytest.raises(Killed):
        killed.fit(TensorBoard(tmp_path / "tb1", enabled=False))
    assert not (tmp_path / "part" / "finish.hdf5").exists()
    resumed, _ = _trainer(tmp_path / "part", epochs=3)
    resumed.run_log = RunLog(resumed.paths.log, keep_existing=True)
    state = load_state(tmp_path / "part" / "latest.pth")
    resumed.run_log.truncate(state["log_lines"])
    resumed.load_resumable_state(state)
    assert resumed.start_epoch == 1 and resumed.iteration == 4
    resumed.fit(TensorBoard(tmp_path / "tb2", enabled=False))
    again = load_hdf5(tmp_path / "part" / "finish.hdf5")
    assert set(again) == set(finish)
    assert all(torch.equal(again[k], finish[k]) for k in finish)
    full_evals = [l.split(" ", 2)[2] for l in (tmp_path / "full" / "log.txt").read_text().splitlines() if "top1=" in l]
    part_evals = [l.split(" ", 2)[2] for l in (tmp_path / "part" / "log.txt").read_text().splitlines() if "top1=" in l]
    assert part_evals == full_evals  # one evaluation line per epoch, no duplicate from the killed epoch


def test_non_finite_loss_stops_and_says_nothing_resumable_was_saved(tmp_path):
    trainer, _ = _trainer(tmp_path, epochs=2, lr=1e30)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(TensorBoard(tmp_path / "tb", enabled=False))
    assert not (tmp_path / "finish.hdf5").exists()
    assert not (tmp_path / "latest.pth").exists()  # it diverged in epoch 1: no state was ever saved
    message = str(info.value)  # what is on disk, truthfully: no claim of a latest.pth
    assert re.search(r"non-finite .* in epoch 1 .*; nothing resumable was saved yet \(only init\.hdf5, the initial "
                     r"weights\)\. Start again .*--lr", message), message
    assert "latest.pth" not in message and "intact" not in message
    last_line = (tmp_path / "log.txt").read_text().splitlines()[-1]  # the log says how the run ended
    assert last_line.split(" ", 2)[2] == f"ERROR: {message}"


def test_non_finite_loss_after_a_saved_epoch_names_that_state(tmp_path):
    trainer, loader = _trainer(tmp_path, epochs=3)

    class DivergingLoader(ListLoader):  # the images become NaN in epoch 2
        def __iter__(self):
            for images, labels in self.batches:
                yield (images if self.epoch_seen[-1] == 0 else images * math.nan), labels

    trainer.train_loader = DivergingLoader(loader.batches)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(TensorBoard(tmp_path / "tb", enabled=False))
    message = str(info.value)
    assert re.search(r"in epoch 2 .*; the last resumable state, latest\.pth after epoch 1 \(iteration 4\), is "
                     r"intact, but continuing it with the same recipe diverges again\.", message), message
    assert load_state(tmp_path / "latest.pth")["epoch"] == 1
    assert (tmp_path / "log.txt").read_text().splitlines()[-1].endswith(f"ERROR: {message}")


# ---------------------------------------------------------------------------- load_model_for_eval
def test_load_model_for_eval_detects_the_form_and_unwraps_in_memory_checkpoints(tmp_path):
    import acnet
    import constructor
    from acnet import WeightsError
    from utils.engine.evaluation import load_model_for_eval

    torch.manual_seed(0)
    trained = constructor.build_model("cfqkbnc", "acb")
    for m in trained.modules():  # non-trivial BN statistics so the two forms are really compared
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    expected = trained.eval()(x)
    ddp_style = {"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}
    from_train = load_model_for_eval("cfqkbnc", "acb", ddp_style)
    assert not from_train.training
    torch.testing.assert_close(from_train(x), expected)

    deploy_path = tmp_path / "deploy.hdf5"
    acnet.save_hdf5(acnet.acnet_switch_to_deploy(trained).state_dict(), deploy_path)
    from_deploy = load_model_for_eval("cfqkbnc", "base", deploy_path)  # deploy weights fit every block type
    torch.testing.assert_close(from_deploy(x), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(WeightsError, match="matches neither"):
        load_model_for_eval("vc", "acb", deploy_path)


def _scalar_points(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``log_dir``: tag -> [(step, value)] (purged points left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_keeps_every_point_across_a_resume(tmp_path):
    """A run killed in epoch 2 (after it logged a point there) and resumed shows the same points as an
    uninterrupted run: the one at the resumed iteration kept, the killed process's later ones replaced."""
    pytest.importorskip("tensorboard")
    full, _ = _trainer(tmp_path / "full", epochs=3)
    board = TensorBoard(tmp_path / "full" / "tb", resume_step=0)
    try:
        full.fit(board)
    finally:
        board.close()
    expected = _scalar_points(tmp_path / "full" / "tb")
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [step for step, _ in expected["val/top1"]] == [4, 8, 12]

    killed, loader = _trainer(tmp_path / "part", epochs=3)

    class DyingLoader(ListLoader):  # epoch 2 dies after two batches (a point at iteration 6 is logged)
        def __iter__(self):
            for index, batch in enumerate(self.batches):
                if self.epoch_seen[-1] == 1 and index == 2:
                    raise Killed
                yield batch

    killed.train_loader = DyingLoader(loader.batches)
    board = TensorBoard(tmp_path / "part" / "tb", resume_step=0)
    with pytest.raises(Killed):
        try:
            killed.fit(board)
        finally:
            board.close()
    assert [step for step, _ in _scalar_points(tmp_path / "part" / "tb")["train/loss"]] == [2, 4, 6]
    resumed, _ = _trainer(tmp_path / "part", epochs=3)
    resumed.run_log = RunLog(resumed.paths.log, keep_existing=True)
    resumed.load_resumable_state(load_state(tmp_path / "part" / "latest.pth"))
    assert resumed.iteration == 4
    board = TensorBoard(tmp_path / "part" / "tb", resume_step=resumed.iteration)  # as utils/modes/train.py does
    try:
        resumed.fit(board)
    finally:
        board.close()
    shown = _scalar_points(tmp_path / "part" / "tb")
    assert {tag: [step for step, _ in points] for tag, points in shown.items()} == \
        {tag: [step for step, _ in points] for tag, points in expected.items()}
    timing = "train/images_per_sec"  # measured, the rest bit-identical
    assert {k: v for k, v in shown.items() if k != timing} == {k: v for k, v in expected.items() if k != timing}


def test_progress_on_a_log_moves_within_the_epoch_in_at_most_ten_lines(tmp_path, capsys):
    """A 25-iteration epoch with the default print_freq (50: one metrics read, at the end): the console (not a
    terminal here) still shows the epoch advance, in 10 lines, the last with the epoch's metrics."""
    trainer, _ = _trainer(tmp_path, epochs=2)
    trainer.train_loader = ListLoader(_learnable_batches(1, n_batches=25, batch=4))
    trainer.iters_per_epoch = 25
    trainer.options.progress_bar, trainer.options.print_freq = True, 50
    trainer.fit(TensorBoard(tmp_path / "tb", enabled=False))
    lines = capsys.readouterr().err.splitlines()
    for epoch in (1, 2):
        mine = [line for line in lines if line.startswith(f"epoch {epoch}/2: ")]
        assert [line.split()[3] for line in mine] == [f"{i}/25" for i in (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)]
        assert "loss=" not in mine[-2] and re.search(r", loss=[\d.]+ top1=[\d.]+ lr=\S+ img_s=\d+$", mine[-1])
    assert len(lines) == 20
