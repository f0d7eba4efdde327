"""bench/ablation_table.py: the paired real-map comparison of two ablation rows."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ablation_table  # noqa: E402


def _real(path: Path, regime: str, per_split: list[float]) -> None:
    m = {"rmse": {v: 1.0 for v in ablation_table.VARS}, "cov90": {v: 0.9 for v in ablation_table.VARS},
         "log_lik": sum(per_split) / len(per_split), "log_lik_stderr": 0.1, "log_lik_per_split": per_split}
    path.write_text(json.dumps({"regimes": {regime: {"era5": {"FlowNP x": m}}}}))


def test_paired_differences_are_per_split(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    base = [-1.0, -2.0, -3.0, -4.0]  # a large spread across splits ...
    _real(res / "silu-real-dense.json", "dense", base)
    _real(res / "pw-real-dense.json", "dense", [b + d for b, d in zip(base, [0.01, 0.03, 0.01, 0.03])])
    _real(res / "jsilu-real-dense.json", "dense", base[:3])  # ... a row on other splits is not paired
    rows = {line.split(" | ")[0]: line for line in ablation_table.paired_table(res)[2:]}
    # ... cancels in the paired difference: mean 0.02, s.e. of [.01, .03, .01, .03] = 0.01155 / 2
    assert "+0.0200 ± 0.0058 (4)" in rows["| pw - silu"]
    assert "| jsilu - silu" not in rows


def test_steps_read_from_the_run_log(tmp_path):
    run = tmp_path / "run-x"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 10, "loss": 1}\n{"step": 20, "val_loss_ema": 1}\n')
    assert ablation_table._steps(run) == "20"
    assert ablation_table._steps(tmp_path / "missing") == ""


def test_paired_real_compares_two_bench_outputs_split_by_split(tmp_path, capsys):
    import paired_real

    base = [-1.0, -2.0, -3.0, -4.0]
    _real(tmp_path / "old.json", "dense", base)
    _real(tmp_path / "new.json", "dense", [b + d for b, d in zip(base, [0.01, 0.03, 0.01, 0.03])])
    paired_real.main([str(tmp_path / "new.json"), str(tmp_path / "old.json"), "--labels", "new,old"])
    lines = capsys.readouterr().out.splitlines()
    new = next(line for line in lines if "| new |" in line)
    assert "+0.0200 ± 0.0058 (4)" in new and "-2.480" in new  # the paired difference sits on A's row
    assert not any("sparse" in line for line in lines)  # a regime neither ran is left out
    assert paired_real.paired_difference(base, base[:3]) is None  # other splits: not paired
