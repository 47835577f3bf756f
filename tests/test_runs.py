"""Runs as the view page reads them: found from paths, summary.csv read whatever its columns, one-line errors."""
import pytest

from conftest import run_stage
from minivlm.use.runs import find_runs, run_row, status


def test_a_sweep_summary_with_later_columns_and_a_pruned_run_is_read_by_name(tmp_path):
    """summary.csv as an Optuna search writes it (steps, worker, a pruned run), rows in the file's order."""
    sweep = tmp_path / "search"
    sweep.mkdir()
    (sweep / "summary.csv").write_text(
        "run,train.lr,steps,final_train_loss,best_eval_loss,image_gap,samples_per_s,wall_s,status,error,worker\n"
        "t0,0.001,40,3.5,3.25,0.125,100.5,2.0,done,,0\n"
        "t1,0.01,10,4.5,4.0,0.0,90.0,1.0,pruned,,1\n")
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["search/t0", "search/t1"] and runs[0].overrides == {"train.lr": "0.001"}
    rows = [run_row(r) for r in runs]
    assert [r["status"] for r in rows] == ["done", "pruned"]  # as the sweep recorded them (no run directories here)
    assert rows[0]["best_eval_loss"] == "3.2500" and rows[0]["image_gap"] == "0.1250"
    assert rows[1]["overrides"] == "train.lr=0.01" and status(runs[1]) == "pruned"


def test_a_folder_of_runs_lists_each_run_once_and_an_empty_one_is_refused(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"step": 3, "loss": 2.0}\n')
    runs = find_runs([tmp_path / "runs", tmp_path / "runs" / "a"])
    assert [r.name for r in runs] == ["a", "b"]
    assert run_row(runs[0])["status"] == "interrupted" and runs[0].caption_disabled().startswith("a: no model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no runs in it"):
        find_runs([tmp_path / "empty"])


@pytest.mark.slow
def test_a_missing_run_directory_is_one_line_and_a_non_zero_exit(tmp_path):
    r = run_stage("view.py", "--runs", str(tmp_path / "nope"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory; pass a run "
                                             "directory, a sweep directory (summary.csv) or a folder of them"]


def test_a_run_whose_directory_a_writer_holds_is_running(tmp_path):
    """The writer lock stage 2 holds while it trains is what makes a run `running` (and the page refresh)."""
    from minivlm.fileio import WriterLock
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    run, = find_runs([run_dir])
    with WriterLock(run_dir):
        assert status(run) == "running"
    assert status(run) == "interrupted"
