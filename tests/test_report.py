"""The typed run report without running the pipeline: JSON round trip and schema versions, report.md,
the plots, the run directory's rank-0 writes, and several runs compared (slimdeploy compare)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slimdeploy.cli import compare
from slimdeploy.distributed import Processes
from slimdeploy.errors import InputError
from slimdeploy.ortbench import LatencyStats
from slimdeploy.report import BEGIN, END, comparison_table, markdown, plot_comparison, sparsity_label, write_marked
from slimdeploy.results import (
    ExportSummary, Int8LatencyRow, Int8Model, Int8Summary, LatencyRow, LayerWidth, ModelSummary, Percentiles,
    ProximalSummary, PruningSummary, ReportError, RunReport, SparsitySummary, Speedup, StageHistory, ZeroedGammaCheck,
)
from slimdeploy.rundir import RunDir

# report.json's keys as the pipeline wrote them before the report was typed: none may go missing.
TOP_KEYS = {"recipe", "model", "dataset", "device", "dense", "pruned", "pruned_no_finetune_accuracy", "macs_counter",
            "pruning", "sparsity", "export", "int8", "runtimes", "latency", "train", "finetune"}
MODEL_KEYS = {"params", "macs", "flops", "macs_flop_counter", "accuracy", "onnx", "latency_ms", "onnx_bytes",
              "peak_rss_mb"}
PRUNING_KEYS = {"how", "channels_total", "channels_kept", "groups", "score_cut", "round_to", "seconds",
                "compensated", "error_vs_zeroed_gamma", "layers", "proximal"}
ROW_KEYS = {"backend", "batch", "threads", "session", "dense", "pruned"}


def _stats(p50: float, batch: int = 1, threads: int = 1) -> LatencyStats:
    return LatencyStats(p50=p50, p90=1.25 * p50, p99=1.5 * p50, mean=1.1 * p50, std=0.1 * p50,
                        throughput=1000 * batch / p50, batch=batch, threads=threads)


def _model(params: int, macs: int, accuracy: float, p50: float) -> ModelSummary:
    return ModelSummary(params=params, macs=macs, flops=2 * macs, macs_flop_counter=macs + 7, accuracy=accuracy,
                        onnx=f"/runs/x/{params}.onnx", latency_ms=Percentiles(p50, 1.25 * p50, 1.5 * p50),
                        onnx_bytes=4 * params, peak_rss_mb=50.0 + params / 1e4)


def _int8() -> Int8Summary:
    ort_row = Int8LatencyRow(batch=1, threads=1, session={"intra_op_spinning": False}, dense_fp32=_stats(2.0),
                             pruned_fp32=_stats(1.0), dense=_stats(0.8), pruned=_stats(0.5),
                             speedup_vs_fp32=Speedup(2.0 / 0.8, 1.0 / 0.5))
    ov_row = Int8LatencyRow(backend="openvino", batch=1, threads=1, session={"runtime": "openvino", "threads": 1},
                            dense_fp32=_stats(1.5), pruned_fp32=_stats(0.9), dense=_stats(0.6), pruned=_stats(0.4),
                            speedup_vs_fp32=Speedup(1.5 / 0.6, 0.9 / 0.4))
    return Int8Summary(target="x86", activation="uint8", weights="int8", reduce_range=True,
                       format="QDQ, per-channel weights", calibration="minmax", calibration_images=32,
                       latency=[ort_row, ov_row],
                       dense=Int8Model(onnx="d.int8.onnx", onnx_bytes=1200, accuracy=90.5, fp32_accuracy=91.0,
                                       accuracy_by_runtime={"openvino": 90.0}),
                       pruned=Int8Model(onnx="p.int8.onnx", onnx_bytes=500, accuracy=89.25, fp32_accuracy=90.0,
                                        accuracy_by_runtime={"openvino": 88.75}))


@pytest.fixture
def report() -> RunReport:
    layers = [LayerWidth("conv1", 16, 8), LayerWidth("layer1.0.conv1", 32, 12), LayerWidth("fc", 10, 10)]
    return RunReport(
        recipe="fixture", model="resnet20", dataset="synthetic", device="cpu",
        dense=_model(1000, 5_000_000, 91.0, 2.0), pruned=_model(400, 2_000_000, 90.0, 1.0),
        pruned_no_finetune_accuracy=42.5,
        pruning=PruningSummary(how="percent", channels_total=58, channels_kept=30, groups=3, score_cut=0.01,
                               round_to=4, seconds=0.5, compensated="exact",
                               error_vs_zeroed_gamma=ZeroedGammaCheck(1e-6, 3.0, 64), layers=layers,
                               proximal=ProximalSummary(xi_zeros=28, channels=58, gamma_nonzero_at_xi_zero=5,
                                                        gamma_max_abs_at_xi_zero=0.0123,
                                                        gamma_mean_abs_at_xi_zero=0.004)),
        sparsity=SparsitySummary(method="proximal", penalty="tl1", lam=1e-4, p=0.5, a=1.0, beta=100.0),
        export=ExportSummary(max_abs_diff=2e-6, max_abs_logit=4.0, opset=17, tolerance=1e-4,
                             dense_max_abs_diff=3e-6, dense_max_abs_logit=5.0),
        int8=_int8(),
        runtimes={"openvino": {"precision": "f32", "max_abs_diff": 1e-6}},
        latency=[
            LatencyRow(backend="onnxruntime", batch=1, threads=1, session={"intra_op_spinning": False},
                       dense=_stats(2.0), pruned=_stats(1.0)),
            LatencyRow(backend="onnxruntime", batch=8, threads=2, session={"intra_op_spinning": False},
                       dense=_stats(9.0, 8, 2), pruned=_stats(6.0, 8, 2)),
            LatencyRow(backend="pytorch", batch=1, threads=1, dense=_stats(3.0), pruned=_stats(2.5)),
        ],
        train=StageHistory(4, 12.3, [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5}]),
        finetune=StageHistory(2, 4.0, [{"epoch": 1, "train_loss": 1.0}]),
    )


def _write(report_json: dict, path: Path) -> Path:
    path.write_text(json.dumps(report_json, indent=1))
    return path


# --- JSON ----------------------------------------------------------------------------------------------

def test_to_json_keeps_every_key_and_adds_the_schema_version(report):
    raw = report.to_json()
    assert raw["schema_version"] == 1 and TOP_KEYS <= set(raw)
    assert MODEL_KEYS <= set(raw["dense"]) and MODEL_KEYS <= set(raw["pruned"])
    assert PRUNING_KEYS <= set(raw["pruning"])
    assert {"name", "before", "after"} == set(raw["pruning"]["layers"][0])
    assert all(set(row) == ROW_KEYS for row in raw["latency"])  # one row shape for every backend
    assert raw["latency"][2]["session"] is None and raw["latency"][0]["dense"]["p50"] == 2.0
    assert set(raw["dense"]["latency_ms"]) == {"p50", "p90", "p99"}
    assert set(raw["int8"]["latency"][0]["speedup_vs_fp32"]) == {"dense", "pruned"}
    assert [(row["backend"], row["session"]["threads"]) for row in raw["int8"]["latency"][1:]] == [("openvino", 1)]
    assert raw["int8"]["pruned"]["accuracy_by_runtime"] == {"openvino": 88.75}
    assert set(raw["train"]) == {"epochs", "seconds", "history"}


def test_json_round_trip(report, tmp_path):
    loaded = RunReport.from_json(_write(report.to_json(), tmp_path / "report.json"))
    assert loaded == report
    assert isinstance(loaded.latency[0].dense, LatencyStats) and isinstance(loaded.int8.dense, Int8Model)


def test_report_without_schema_version_reads_as_version_1(report, tmp_path):
    # as written before the version field: no schema_version, no null keys added since
    raw = report.to_json()
    del raw["schema_version"], raw["pruning"]["proximal"], raw["latency"][2]["session"]
    for side in ("dense", "pruned"):
        del raw[side]["onnx_bytes"], raw[side]["peak_rss_mb"]
    raw["int8"]["latency"] = raw["int8"]["latency"][:1]  # INT8 was timed in onnxruntime alone
    del raw["int8"]["latency"][0]["backend"], raw["int8"]["latency"][0]["session"]
    for side in ("dense", "pruned"):
        del raw["int8"][side]["accuracy_by_runtime"]
    loaded = RunReport.from_json(_write(raw, tmp_path / "old.json"))
    assert loaded.schema_version == 1 and loaded.pruning.proximal is None and loaded.latency[2].session is None
    assert loaded.dense.macs == report.dense.macs
    (int8_row,) = loaded.int8.latency
    assert (int8_row.backend, int8_row.session) == ("onnxruntime", None)
    assert loaded.int8.dense.accuracy_by_runtime == {} and loaded.int8.pruned.accuracy == 89.25


@pytest.mark.parametrize("version", [99, 0, "1", True])
def test_unknown_schema_version_is_refused_in_one_line(report, tmp_path, version):
    path = _write({**report.to_json(), "schema_version": version}, tmp_path / "future.json")
    with pytest.raises(ReportError) as err:
        RunReport.from_json(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "schema_version" in message
    assert "reads version 1" in message


def test_keys_missing_or_of_the_wrong_type_are_named(report, tmp_path):
    raw = report.to_json()
    raw["dense"]["params"] = "many"
    with pytest.raises(ReportError, match=r"bad\.json: .*dense\.params"):
        RunReport.from_json(_write(raw, tmp_path / "bad.json"))
    raw = report.to_json()
    del raw["pruning"]
    with pytest.raises(ReportError, match="pruning: Field required"):
        RunReport.from_json(_write(raw, tmp_path / "bad.json"))
    with pytest.raises(ReportError, match="absent.json"):
        RunReport.from_json(tmp_path / "absent.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="no JSON object"):
        RunReport.from_json(tmp_path / "list.json")


# --- report.md and the plots ---------------------------------------------------------------------------

def test_markdown_shows_the_report(report):
    md = markdown(report, ["scores.png", "widths.png"])
    d, p = report.dense, report.pruned
    assert md.startswith("# fixture: resnet20 on synthetic\n")
    assert f"| params | {d.params:,} | {p.params:,} | {d.params / p.params:.2f}× |" in md
    assert f"| accuracy right after pruning (%) | | {report.pruned_no_finetune_accuracy:.2f} | |" in md
    macs_cut = d.macs / p.macs
    for row in report.latency:
        speedup = row.dense.p50 / row.pruned.p50
        assert (f"| {row.backend} p50 / p90 (ms), batch {row.batch}, {row.threads} thread(s) | "
                f"{row.dense.p50:.3f} / {row.dense.p90:.3f} | {row.pruned.p50:.3f} / {row.pruned.p90:.3f} | "
                f"{speedup:.2f}× (÷ MACs cut: {speedup / macs_cut:.2f}) |") in md
    assert f"| ONNX file (MB) | {d.onnx_bytes / 1e6:.2f} |" in md and "| peak RSS" in md
    assert "ONNX check (opset 17)" in md
    assert "uint8 activations, int8 weights (7-bit range), minmax calibration on 32 training images" in md
    for q in report.int8.latency:
        assert (f"| {q.backend} p50 (ms) INT8 / FP32, batch {q.batch}, {q.threads} thread(s) | "
                f"{q.dense.p50:.3f} / {q.dense_fp32.p50:.3f} ({q.speedup_vs_fp32.dense:.2f}×) | "
                f"{q.pruned.p50:.3f} / {q.pruned_fp32.p50:.3f} ({q.speedup_vs_fp32.pruned:.2f}×) |") in md
    assert "| top-1 accuracy (%), INT8 / FP32 ONNX in onnxruntime | 90.50 / 91.00 | 89.25 / 90.00 |" in md
    assert "| top-1 accuracy (%), INT8 in openvino | 90.00 | 88.75 |" in md
    assert "Channels kept: 30 of 58 (51.7 %)." in md
    assert "Proximal NS: 28 of 58 ξ are exactly zero; 5 of their γ are not (max |γ| 0.0123)." in md
    assert "![scores](scores.png)" in md and "![widths](widths.png)" in md and "latency.png" not in md
    assert md.endswith("| conv1 | 16 | 8 |\n| layer1.0.conv1 | 32 | 12 |\n| fc | 10 | 10 |\n")


def test_markdown_without_export_int8_or_latency(report):
    bare = replace(report, export=None, int8=None, latency=[],
                   dense=replace(report.dense, onnx=None, latency_ms=None, onnx_bytes=None, peak_rss_mb=None),
                   pruning=replace(report.pruning, proximal=None))
    md = markdown(bare, [])
    assert "| params |" in md
    for absent in ("ONNX check", "INT8", "ONNX file", "peak RSS", "p50", "Proximal NS", "!["):
        assert absent not in md


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_dir_writes_the_report_and_its_plots(report, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    run_dir.write_pruning_plots(np.array([0.0, 0.0, 1e-3, 0.2, 0.5]), "|ξ|", report.pruning.layers)
    run_dir.write_latency_plot(report.latency)
    run_dir.write_report(report)
    assert sorted(p.name for p in run_dir.root.iterdir()) == ["latency.png", "report.json", "report.md",
                                                                "scores.png", "widths.png"]
    assert all(_png(run_dir.root / name) for name in ("latency.png", "scores.png", "widths.png"))
    assert RunReport.from_json(run_dir.report_json) == report
    assert "![latency](latency.png)" in run_dir.report_md.read_text()


def test_run_dir_writes_nothing_off_rank_0(report, tmp_path):
    from slimdeploy.recipe import build_recipe

    other = RunDir(tmp_path / "run", Processes(rank=1, world=2))
    assert not other.owner
    other.write_recipe(build_recipe({}))
    other.write_pruning_plots(np.array([0.5]), "|γ|", report.pruning.layers)
    other.write_latency_plot(report.latency)
    other.write_report(report)
    assert not other.root.exists()


def test_run_dir_names_the_contract_files(tmp_path):
    run_dir = RunDir(tmp_path)
    names = [run_dir.recipe, run_dir.sparse_checkpoint, run_dir.finetune_checkpoint, run_dir.weights("dense"),
             run_dir.weights("pruned"), run_dir.plan, *run_dir.onnx_files(), run_dir.int8_onnx("pruned"),
             run_dir.report_json, run_dir.report_md, run_dir.scores_png, run_dir.widths_png, run_dir.latency_png]
    assert [str(p.relative_to(tmp_path)) for p in names] == [
        "recipe.yaml", "checkpoints/last.pt", "checkpoints/finetune_last.pt", "dense.pt", "pruned.pt",
        "pruned_plan.json", "dense.onnx", "pruned.onnx", "pruned.int8.onnx", "report.json", "report.md",
        "scores.png", "widths.png", "latency.png"]
    with pytest.raises(ValueError, match="dense, pruned"):
        run_dir.onnx("teacher")


# --- several runs (slimdeploy compare) ---------------------------------------------------------------

def test_sparsity_label():
    s = SparsitySummary(method="proximal", penalty="tl1", lam=1e-4, p=0.5, a=1.0, beta=100.0)
    assert sparsity_label(s) == "proximal TL1 (a=1), λ=0.0001, β=100"
    assert sparsity_label(replace(s, method="subgradient", penalty="lp", p=0.75)) == "subgradient Lp (p=0.75), λ=0.0001"
    assert sparsity_label(replace(s, method="none")) == "none"


def test_comparison_table(report):
    no_ort = replace(report, latency=[row for row in report.latency if row.backend == "pytorch"],
                     sparsity=replace(report.sparsity, method="none"))
    lines = comparison_table([("a", report), ("b", no_ort)]).splitlines()
    assert len(lines) == 4 and lines[1] == "|" + "---|" * 10
    assert lines[0].endswith("| ORT speedup b1/1thr | ORT speedup b8/2thr |")
    assert lines[2] == ("| a | proximal TL1 (a=1), λ=0.0001, β=100 | 91.00 | 42.50 | 90.00 | 48 % | 60 % "
                        "| 60 % (2.50×) | 2.00× | 1.50× |")
    assert lines[3].startswith("| b | none |") and lines[3].endswith("| – | – |")


def test_comparison_plots_skip_runs_without_latency(report, tmp_path):
    written = plot_comparison([("a", report)], tmp_path)
    assert [p.name for p in written] == ["accuracy_vs_macs.png", "accuracy_vs_latency.png"]
    assert all(map(_png, written))
    no_ort = replace(report, latency=[])
    assert [p.name for p in plot_comparison([("b", no_ort)], tmp_path)] == ["accuracy_vs_macs.png"]


def test_write_marked_replaces_only_the_block(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"intro\n{BEGIN}\nstale\n{END}\noutro\n")
    write_marked(doc, "| new |\n")
    assert doc.read_text() == f"intro\n{BEGIN}\n| new |\n{END}\noutro\n"
    alone = tmp_path / "alone.md"
    write_marked(alone, "| new |\n")
    assert alone.read_text() == "| new |\n"


def test_write_marked_refuses_a_hand_written_document_without_the_markers(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# My notes\nhand-written\n")
    with pytest.raises(InputError, match=f"notes.md: has no block between {BEGIN} and {END}"):
        write_marked(doc, "| new |\n")
    assert doc.read_text() == "# My notes\nhand-written\n"  # untouched


def test_compare_cli_reads_run_dirs_and_files(report, tmp_path, capsys):
    run_dir = RunDir(tmp_path / "l1")
    run_dir.root.mkdir()
    run_dir.write_report(report)
    other = _write(report.to_json(), tmp_path / "tl1.json")
    md = tmp_path / "table.md"
    assert compare.main([str(run_dir.root), str(other), "--out", str(tmp_path / "plots"), "--md", str(md)]) == 0
    rows = md.read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| l1 |") and rows[3].startswith("| tl1 |")
    assert (tmp_path / "plots" / "accuracy_vs_latency.png").is_file()
    hand_written = tmp_path / "README.md"
    hand_written.write_text("# Results\n")
    assert compare.main([str(other), "--out", str(tmp_path / "plots"), "--md", str(hand_written)]) != 0
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {hand_written}: has no block") and "\n" not in error
    assert hand_written.read_text() == "# Results\n"


def test_compare_cli_refuses_a_newer_report_in_one_line(report, tmp_path, capsys):
    newer = _write({**report.to_json(), "schema_version": 99}, tmp_path / "newer.json")
    assert compare.main([str(newer), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer.json" in err[0] and "99" in err[0]
