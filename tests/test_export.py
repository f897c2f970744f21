"""ONNX export (acnet.export, do_acnet.py --export-onnx) and int8 PTQ (utils.engine.deploy): the exported graph
equals the PyTorch deploy model, has the base model's operators for every block type, and bad input
ends in one line with no file left behind."""
from __future__ import annotations

import json
import shutil
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import constructor
import do_acnet
from acnet import acnet_switch_to_deploy, convert_to_acnet
from acnet.export import ExportError, MissingExtraError, export_onnx, onnx_op_counts
from helpers import mild_bn_statistics_
from utils.engine.deploy import int8_path, quantize_int8

SMALL_INPUT = 32  # every arch (ImageNet ones too) runs on 32x32; the graph does not depend on the size


def ort_run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("arch", constructor.list_archs())
def test_every_arch_exports_equal_to_pytorch_with_the_base_operator_counts(arch, tmp_path):
    x = torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(1))
    counts = {}
    for seed, block in enumerate(constructor.BLOCK_TYPES):
        torch.manual_seed(seed)
        if block not in ("base", "acb", "dbb", "orepa"):  # the newer families export as blocks (test_export_families)
            continue
        model = mild_bn_statistics_(constructor.build_model(arch, block), seed)  # training-time form
        result = export_onnx(model, x, tmp_path / f"{block}.onnx")
        assert result.rel_diff <= 1e-5, (block, result.summary())
        assert result.opset >= 18
        proto = onnx.load(tmp_path / f"{block}.onnx")
        assert onnx_op_counts(proto) == result.op_counts
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
        counts[block] = result.op_counts
    assert counts["acb"] == counts["base"] and counts["dbb"] == counts["base"], counts
    int8 = quantize_int8(tmp_path / "dbb.onnx", tmp_path / "dbb.int8.onnx", [x.numpy()])  # every arch quantizes
    assert ort_run(int8, x).shape == (2, constructor.get_arch_spec(arch).num_classes)


def test_plug_in_model_export_keeps_the_callers_model_and_has_a_dynamic_batch(tmp_path):
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), "dbb")
    mild_bn_statistics_(model, 0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, x, tmp_path / "r18.onnx")
    assert type(model.layer1[0].conv1).__name__ == "DiverseBranchBlock"  # exported a deploy copy
    assert result.op_counts["Conv"] == 20 and "BatchNormalization" not in result.op_counts
    batch5 = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = acnet_switch_to_deploy(model)(batch5)
    actual = ort_run(tmp_path / "r18.onnx", batch5)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return x * 2
        return x


def test_a_model_that_does_not_export_leaves_no_file(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="does not export to ONNX") as info:
        export_onnx(DataDependent(), torch.randn(2, 3, 4, 4), out)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_no_file(tmp_path):
    out = tmp_path / "m.onnx"
    model = constructor.build_model("cfqkbnc", "base").eval()
    with pytest.raises(ExportError, match="onnxruntime differs"):
        export_onnx(model, torch.randn(2, 3, 32, 32), out, rtol=-1.0)  # no difference passes a negative limit
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write") as info:
        export_onnx(constructor.build_model("cfqkbnc", "base"), torch.randn(2, 3, 32, 32), blocker / "m.onnx")
    assert "\n" not in str(info.value)


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[deploy\]"'):
        export_onnx(constructor.build_model("cfqkbnc", "base"), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture
def run_copy(quickstart_run, tmp_path):
    """A private copy of the quickstart run (cfqkbnc / acb / synthetic), so its summary may change."""
    return shutil.copytree(quickstart_run, tmp_path / "run")


def cli(args, capsys):
    capsys.readouterr()
    try:
        do_acnet.main(args)
        status = 0
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_exports_training_time_weights_and_quantizes_into_the_run_summary(run_copy, tmp_path, capsys):
    out = tmp_path / "onnx" / "cfq.onnx"
    status, stdout, err = cli(["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--workers", "0",
                               "--export-onnx", run_copy / "finish.hdf5", out, "--quantize", "int8",
                               "--calib-images", "64"], capsys)
    assert status == 0, err
    log = (run_copy / "log.txt").read_text()  # the run's log (the logger echoes it to stdout)
    assert "onnx.checker (full check): passed" in log and "relative" in log and "int8 acc1" in log
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["onnx_opset"] >= 18 and summary["onnx_rel_diff"] <= 1e-5
    assert summary["calib_images"] == 64 and summary["eval_images"] == 256
    for key in ("fp32_top1", "fp32_top5", "int8_top1", "int8_top5"):
        assert 0 <= summary[key] <= 100
    assert summary["fp32_top1"] == pytest.approx(summary["deploy_top1"], abs=100 / 256 + 1e-9)
    int8 = onnx.load(int8_path(out))
    ops = onnx_op_counts(int8)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    weights = {init.name: init for init in int8.graph.initializer}
    conv_weights = [weights[n.input[0]] for n in int8.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in weights
                    and weights[n.input[0]].data_type == onnx.TensorProto.UINT8 and len(weights[n.input[0]].dims) == 4]
    assert conv_weights, "no 8-bit conv weights (stored as uint8, zero point 128)"
    scales = [weights[n.input[1]] for n in int8.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in weights and len(weights[n.input[0]].dims) == 4]
    assert all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)  # per-channel


def test_cli_exports_deploy_weights_beside_out_without_a_run(run_copy, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_copy / "finish_deploy.hdf5", alone / "deploy.hdf5")
    out = tmp_path / "x.onnx"
    status, stdout, err = cli(["-a", "cfqkbnc", "-b", "dbb", "--export-onnx", alone / "deploy.hdf5", out], capsys)
    assert status == 0, err
    assert "onnx.checker (full check): passed" in stdout and "relative" in stdout
    assert out.is_file() and json.loads((tmp_path / "x.summary.json").read_text())["onnx_rel_diff"] <= 1e-5


def test_cli_export_prints_its_lines_once_and_nothing_of_the_exporter(run_copy, tmp_path):
    """In a process of its own (the exporter's loggers and prints as a user meets them): the run's three
    lines, each once, on stdout; nothing of torch.onnx / onnxscript ("PassManager", "No unused ...")."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cfq.onnx"
    result = subprocess.run([sys.executable, str(root / "do_acnet.py"), "-a", "cfqkbnc", "-b", "acb", "--dataset",
                             "synthetic", "--export-onnx", str(run_copy / "finish.hdf5"), str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    messages = [line.split(" ", 2)[2] for line in result.stdout.splitlines()]  # without the timestamp
    assert [m.split(" ", 1)[0] for m in messages] == ["exported", "onnx.checker", "summary"], result.stdout
    assert messages[0].startswith(f"exported {run_copy / 'finish.hdf5'} -> {out} (opset ")
    assert messages[2] == f"summary written: {run_copy / 'summary.json'}"


def test_export_is_quiet_unless_verbose(tmp_path, caplog):
    model = constructor.build_model("cfqkbnc", "acb").eval()
    x = torch.randn(2, 3, 32, 32)
    caplog.set_level("DEBUG")
    export_onnx(model, x, tmp_path / "quiet.onnx")
    assert [r.name for r in caplog.records if r.levelno >= 20] == []
    assert not any(r.name.startswith(("onnx_ir", "onnxscript", "torch.onnx")) for r in caplog.records)
    assert "acnet.export" in [r.name for r in caplog.records]  # its result, at DEBUG
    caplog.clear()
    export_onnx(model, x, tmp_path / "verbose.onnx", verbose=True)
    assert any(r.name.startswith(("onnx_ir", "onnxscript")) for r in caplog.records)


def test_cli_weights_of_another_arch_is_one_line_and_no_file(run_copy, tmp_path, capsys):
    out = tmp_path / "vc.onnx"
    status, _, err = cli(["-a", "vc", "-b", "acb", "--export-onnx", run_copy / "finish.hdf5", out], capsys)
    assert status == 1
    assert len(err.strip().splitlines()) == 1 and "matches neither" in err
    assert not out.exists()


def test_cli_missing_extra_is_one_line(run_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    status, _, err = cli(["-a", "cfqkbnc", "-b", "acb", "--export-onnx", run_copy / "finish.hdf5",
                          tmp_path / "m.onnx"], capsys)
    assert status == 1
    assert err.strip().splitlines() == ['do_acnet.py: error: onnxruntime is not installed: the ONNX / int8 tools '
                                        'need the \'deploy\' extra (pip install -e ".[deploy]")']


def test_cli_unwritable_out_is_one_line(run_copy, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status, _, err = cli(["-a", "cfqkbnc", "-b", "acb", "--export-onnx", run_copy / "finish.hdf5",
                          blocker / "m.onnx"], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1 and "cannot write" in err


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int8"], "--quantize applies to --export-onnx"),
    (["--export-onnx", "missing.hdf5", "m.onnx"], "does not exist"),
    (["--qat"], "--init-weights"),
])
def test_cli_usage_errors(extra, message, capsys):
    status, _, err = cli(["-a", "cfqkbnc", *extra], capsys)
    assert status == 2 and message in err


def test_bench_deploy_prints_the_table_for_a_run(run_copy, tmp_path):
    import subprocess
    from pathlib import Path

    exps = tmp_path / "exps"
    exps.mkdir()
    deploy_top1 = json.loads((run_copy / "summary.json").read_text())["deploy_top1"]
    shutil.move(str(run_copy), exps / "cfqkbnc_acb_synthetic_train")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_deploy.py"), "--exps", str(exps),
                             "--archs", "cfqkbnc", "--batch", "2", "--rounds", "1", "--steps", "1", "--threads", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| cfqkbnc | acb |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "synthetic" and float(cells[3]) == pytest.approx(deploy_top1, abs=0.01)
    assert cells[4] == cells[5] == cells[6] == "-"  # no PTQ / QAT run yet
    assert all(float(c) > 0 for c in cells[7:])


@pytest.mark.parametrize("block", ["ecb", "dilated"])
def test_the_newer_families_export_equal_to_pytorch_with_the_base_operator_counts(block, tmp_path):
    x = torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    base = export_onnx(mild_bn_statistics_(constructor.build_model("cfqkbnc", "base"), 0), x, tmp_path / "base.onnx")
    model = mild_bn_statistics_(constructor.build_model("cfqkbnc", block), 1)
    result = export_onnx(model, x, tmp_path / f"{block}.onnx")
    assert result.rel_diff <= 1e-5, result.summary()
    assert result.op_counts == base.op_counts  # exported deployed: one conv per unit
