"""An arch is declared once: one ``register_arch`` call, and every tool has it.

The arch below is registered at run time (no file of the project is edited): do_acnet.py trains it,
converts it and evaluates the deploy weights, show_log.py lists the run beside the numbers the arch
declares, reproduce.py --dry-run plans it, and the weights loaders say it has no original layout.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import constructor
from constructor import ArchSpec, PublishedResult, register_arch, unregister_arch

ARCH = "tinyc"


class TinyNet(nn.Module):
    """Two 3x3 conv-BN-ReLU units (the blocks go there), global pooling, a linear classifier."""

    def __init__(self, builder: constructor.ConvBuilder, num_classes: int) -> None:
        super().__init__()
        self.conv1 = builder.conv_bn_relu(3, 8, 3, padding=1)
        self.conv2 = builder.conv_bn_relu(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv2(self.conv1(x))).flatten(1))


@pytest.fixture
def tiny_arch():
    spec = register_arch(ArchSpec(
        ARCH, "cifar10", 32, 10, "two-unit test net", lambda builder, n: TinyNet(builder, n), recipe="cfqkbnc",
        published=(PublishedResult(ARCH, "cifar10", "test table", {"base": 50.0, "acb": 51.5}),)))
    yield spec
    unregister_arch(ARCH)


@pytest.mark.slow
def test_a_registered_arch_trains_converts_evaluates_and_is_listed(tiny_arch, tmp_path, capsys):
    import do_acnet
    import reproduce
    import show_log

    exps = tmp_path / "exps"
    common = ["-a", ARCH, "-b", "acb", "--dataset", "synthetic", "--synthetic-num-train", "64",
              "--synthetic-num-val", "64", "--workers", "0", "--no-progress"]
    do_acnet.main([*common, "--epochs", "1", "--batch-size", "32", "--output-dir", str(exps)])
    run = exps / f"{ARCH}_acb_synthetic_train"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["arch"] == ARCH and summary["max_rel_logit_diff"] < 1e-5
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["lr"] == 0.1 and recipe["block_kwargs"] == {"gamma_init": pytest.approx(1 / 3)}  # cfqkbnc's

    deploy = tmp_path / "deploy.hdf5"
    do_acnet.main(["-a", ARCH, "-b", "acb", "--convert", str(run / "finish.hdf5"), str(deploy)])
    do_acnet.main([*common, "--eval-only", str(deploy)])
    printed = capsys.readouterr().out
    assert f"converted {run / 'finish.hdf5'} -> {deploy}" in printed
    assert f"{deploy} on synthetic (64 images): top1={summary['deploy_top1']:.4f}" in printed

    assert show_log.main([str(exps), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert f"{run.name}," in table
    assert show_log.published_reference(ARCH, "cifar10", "acb").top1 == {"base": 50.0, "acb": 51.5}

    assert reproduce.main(["--archs", ARCH, "--blocks", "base", "acb", "--seeds", "0", "--dataset", "synthetic",
                           "--output-dir", str(exps), "--dry-run", "--", "--epochs", "1", "--batch-size", "32",
                           "--synthetic-num-train", "64", "--synthetic-num-val", "64"]) == 0
    plan = capsys.readouterr().out
    assert f"-a {ARCH} -b base" in plan and f"# done: {run.name}" in plan


def test_an_arch_without_original_layouts_has_only_our_schemes(tiny_arch, tmp_path):
    from constructor.original_formats import families_of, original_schemes, recognise_weights

    from acnet import WeightsError

    assert families_of(ARCH) == () and original_schemes(ARCH) == ()
    model = constructor.build_model(ARCH, "dbb")
    found = recognise_weights(ARCH, model.state_dict())
    assert found.scheme.name == "ours/dbb" and found.block_type == "dbb"
    with pytest.raises(WeightsError, match=f"nor any file of the original ACNet / DBB code for {ARCH}"):
        recognise_weights(ARCH, {"x.weight": torch.zeros(1)})


def test_a_taken_name_is_refused_and_unregistering_removes_it(tiny_arch):
    with pytest.raises(ValueError, match="already registered"):
        register_arch(tiny_arch)
    assert ARCH in constructor.list_archs()
    unregister_arch(ARCH)
    assert ARCH not in constructor.list_archs()
    register_arch(tiny_arch)  # for the fixture's teardown
