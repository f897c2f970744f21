"""Weights holding NaN or inf (what a diverged run saves) are refused in one line by every tool that uses
weights: --convert, --eval-only, --export-onnx (with and without --quantize), --init-weights (training and
--qat) and acnet_fuse_and_load. The line names the file and the first offending entry, the exit status is
2, and nothing is written (no output file, no temporary file, no run folder, no downloaded data)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import constructor
import do_acnet
from acnet import NonFiniteWeightsError, WeightsError, acnet_fuse_and_load, check_finite_weights, save_hdf5

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SYNTHETIC = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--synthetic-num-train", "32",
             "--synthetic-num-val", "16", "--batch-size", "16", "--workers", "0", "--no-progress"]


# ------------------------------------------------------------------------------------------ the check
def test_finite_weights_and_integer_entries_pass():
    state = {"w": torch.randn(3, 3), "n": torch.tensor(7), "h": torch.ones(2, dtype=torch.float16)}
    check_finite_weights(state, "'x.hdf5'")  # no exception


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_the_first_non_finite_entry_is_named_with_its_counts(bad, dtype):
    state = {"a.weight": torch.zeros(4, dtype=dtype), "b.weight": torch.zeros(10, dtype=dtype),
             "c.num_batches_tracked": torch.tensor(3), "d.weight": torch.zeros(2, dtype=dtype)}
    state["b.weight"][[1, 5]] = bad
    state["d.weight"][0] = bad
    with pytest.raises(NonFiniteWeightsError) as info:
        check_finite_weights(state, "'run/finish.hdf5'")
    message = str(info.value)
    kind = "NaN" if math.isnan(bad) else "inf"
    assert message.startswith(f"'run/finish.hdf5' holds non-finite weights: entry 'b.weight' has 2 {kind} of "
                              "its 10 values; 1 more of the 4 entries do too")
    assert "\n" not in message and isinstance(info.value, WeightsError)


def test_nan_and_inf_in_one_tensor_are_both_counted():
    state = {"w": torch.tensor([math.nan, math.inf, 1.0, -math.inf])}
    with pytest.raises(NonFiniteWeightsError, match=r"entry 'w' has 1 NaN and 2 inf of its 4 values \("):
        check_finite_weights(state)


# ------------------------------------------------------------------------------------------ every entry point
@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> tuple[Path, str]:
    """cfqkbnc / acb training-time weights whose fourth entry holds a NaN, and that entry's name."""
    torch.manual_seed(0)
    state = constructor.build_model("cfqkbnc", "acb").state_dict()
    key = list(state)[3]
    state[key].view(-1)[1] = math.nan
    path = tmp_path_factory.mktemp("nan") / "diverged.hdf5"
    save_hdf5(state, path)
    return path, key


def refused(argv, capsys, where: Path, key: str, weights: Path) -> None:
    """do_acnet.py refuses with status 2 and one line naming the file and the entry; ``where`` stays empty."""
    with pytest.raises(SystemExit) as info:
        do_acnet.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"^do_acnet\.py: error: .*'{re.escape(str(weights))}' holds non-finite weights: "
                     rf"entry '{re.escape(key)}' has 1 NaN", err), err
    assert sorted(p.name for p in where.rglob("*")) == [], "nothing may be written"


ENTRY_POINTS = {
    "convert": lambda w, out: ["--convert", w, out / "deploy.hdf5"],
    "convert_pth": lambda w, out: ["--convert", w, out / "deploy.pth"],
    "eval_only": lambda w, out: ["--eval-only", w],
    "init_weights": lambda w, out: ["--init-weights", w, "--epochs", "1", "--output-dir", out / "exps"],
}


def test_eval_only_refuses_before_touching_the_data(nan_weights, tmp_path, capsys, monkeypatch):
    """On the arch's own dataset (CIFAR-10, download on): refused before cifar10_data/ is created."""
    weights, key = nan_weights
    monkeypatch.chdir(tmp_path)
    refused(["-a", "cfqkbnc", "-b", "acb", "--workers", "0", "--eval-only", weights], capsys, tmp_path, key, weights)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_do_acnet_refuses_non_finite_weights_and_writes_nothing(entry, nan_weights, tmp_path, capsys, monkeypatch):
    weights, key = nan_weights
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # a dataset download or a default output folder would land here
    refused([*SYNTHETIC, *ENTRY_POINTS[entry](weights, out)], capsys, out, key, weights)


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]], ids=["fp32", "int8"])
def test_export_onnx_refuses_non_finite_weights(quantize, nan_weights, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    weights, key = nan_weights
    monkeypatch.chdir(tmp_path)
    refused([*SYNTHETIC, "--export-onnx", weights, tmp_path / "m.onnx", *quantize], capsys, tmp_path, key, weights)


def test_qat_refuses_non_finite_init_weights(nan_weights, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    weights, key = nan_weights
    monkeypatch.chdir(tmp_path)
    refused([*SYNTHETIC, "--qat", "--init-weights", weights, "--epochs", "1", "--output-dir", tmp_path / "exps"],
            capsys, tmp_path, key, weights)


def test_a_nan_in_a_skipped_classifier_is_not_used_so_not_refused(tmp_path):
    from utils.engine.init_weights import load_init_weights

    torch.manual_seed(0)
    state = constructor.build_model("cfqkbnc", "acb").state_dict()
    state["fc2.weight"].fill_(math.nan)  # the classifier
    path = tmp_path / "w.hdf5"
    save_hdf5(state, path)
    model = constructor.build_model("cfqkbnc", "acb")
    with pytest.raises(NonFiniteWeightsError, match="entry 'fc2.weight'"):
        load_init_weights(model, path, block_type="acb", arch="cfqkbnc")
    record = load_init_weights(model, path, block_type="acb", arch="cfqkbnc", skip_classifier=True)
    assert record["classifier"].startswith("replaced")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("in_memory", [False, True], ids=["file", "state_dict"])
def test_fuse_and_load_refuses_non_finite_weights_and_leaves_the_model_unchanged(nan_weights, in_memory):
    from acnet import load_hdf5

    weights, key = nan_weights
    base = constructor.build_model("cfqkbnc", "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    source = load_hdf5(weights) if in_memory else weights
    named = "the given state dict" if in_memory else f"'{weights}'"
    with pytest.raises(NonFiniteWeightsError, match=rf"^{re.escape(named)} holds non-finite weights: "
                                                    rf"entry '{re.escape(key)}' has 1 NaN"):
        acnet_fuse_and_load(base, source, block_type="acb")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
