"""The launcher without a cluster: the generated sbatch script (golden), resource validation, the debug executor."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from repro.cli import main
from repro.config import ConfigError, load_config, preset_dict, resources_for

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"

SITE = ["launcher.executor=slurm", "launcher.container=apptainer", "launcher.image=/images/repro.sif",
        "launcher.image_digest=sha256:0123abcd", "launcher.bind=[/data]", "launcher.setup=[module load cuda/12.4]",
        "launcher.resources={partition: gpu, account: proj, time_min: 240, mem_gb: 64, cpus_per_task: 8}",
        "launcher.stages={ddo: {gpus_per_node: 8, nodes: 2, time_min: 1440, extra: {exclusive: true}}}"]


def _normalize(text: str, root: Path) -> str:
    return text.replace(str(root.resolve()), "<ROOT>").replace(sys.executable, "<PYTHON>")


def test_job_script_matches_golden(tmp_path):
    """The sbatch script of a multi-node DDO stage in an Apptainer image (REPRO_UPDATE_GOLDEN=1 rewrites it)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    r = CliRunner().invoke(main, ["job-script", "ddo", "--params", str(tmp_path / "params.yaml"),
                                  *[a for s in SITE for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    text = _normalize(r.output, tmp_path)
    golden = GOLDEN / "job_script_ddo.sh"
    if os.environ.get("REPRO_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    # what the golden file must say, independently of its exact layout
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2",
                 "#SBATCH --time=1440", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --mem=65536MB",
                 "export REPRO_IMAGE_DIGEST=sha256:0123abcd", "module load cuda/12.4",
                 "apptainer exec --nv --bind /data /images/repro.sif python -u -m submitit.core._submit"):
        assert line in text, line


def test_stage_resources_override_the_defaults():
    cfg = load_config(preset="micro", overrides=SITE)
    ddo, fid = resources_for(cfg.launcher, "ddo"), resources_for(cfg.launcher, "fid")
    assert (ddo.gpus_per_node, ddo.nodes, ddo.time_min, ddo.partition, ddo.mem_gb) == (8, 2, 1440, "gpu", 64.0)
    assert (fid.gpus_per_node, fid.nodes, fid.time_min, fid.partition) == (0, 1, 240, "gpu")


@pytest.mark.parametrize("override, field, fix", [
    ("launcher.executor=pbs", "launcher.executor", "local, debug, slurm"),
    ("launcher.resources.gpus_per_node=-1", "launcher.resources.gpus_per_node", ">= 0"),
    ("launcher.resources.mem_gb=0", "launcher.resources.mem_gb", "> 0"),
    ("launcher.stages={ddo: {gpu: 1}}", "launcher.stages.ddo.gpu", "gpus_per_node"),
    ("launcher.stages={training: {nodes: 2}}", "launcher.stages.training", "ddo"),
    ("launcher.stages={ddo: {time_min: soon}}", "launcher.stages.ddo.time_min", "whole number"),
    ("launcher.stages={ddo: {gpus_per_node: 4, tasks_per_node: 2}}", "launcher.stages.ddo.tasks_per_node",
     "one per GPU"),
    ("launcher.resources.extra={time: 10}", "launcher.resources.extra.time", "own field"),
    ("launcher.container=pyxis", "launcher.image", "image reference"),
])
def test_bad_resource_requests_are_clear_errors(tmp_path, override, field, fix):
    with pytest.raises(ConfigError) as e:
        load_config(preset="micro", overrides=[override])
    assert field in str(e.value) and fix in str(e.value)
    # the CLI: exit 2, the field and the fix, no traceback, nothing written
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "repro.cli", "data", "--params", str(tmp_path / "params.yaml"),
                        "--set", override], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and field in p.stderr and "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["params.yaml"]


def test_debug_executor_runs_the_stage_through_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_TRACKING", "off")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("REPRO_IN_JOB", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    r = CliRunner().invoke(main, ["data", "--params", str(tmp_path / "params.yaml"), "--set", "launcher.executor=debug",
                                  "--set", "launcher.poll_s=0.1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "digits.npz").is_file()
    assert list((tmp_path / "runs" / "slurm").iterdir())  # submitit's job folder: it went through submitit
    # a failing stage fails the command with the stage's own error (submitit's debug executor re-raises it, after
    # offering pdb; with no terminal pdb reads EOF and continues): a missing input is exit 2, as locally
    r = CliRunner().invoke(main, ["fid", "--params", str(tmp_path / "params.yaml"), "--set", "launcher.executor=debug",
                                  "--set", "launcher.poll_s=0.1"], input="")
    assert r.exit_code == 2 and "samples not found" in r.output


def test_slurm_executor_without_slurm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("REPRO_IN_JOB", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    r = CliRunner().invoke(main, ["data", "--params", str(tmp_path / "params.yaml"), "--set", "launcher.executor=slurm"])
    assert r.exit_code == 1 and "no SLURM client" in r.output and "launcher.executor: local" in r.output
    assert not (tmp_path / "data").exists()


def test_inside_a_job_stages_run_here(tmp_path, monkeypatch):
    """A job never submits another job: with SLURM_JOB_ID set the slurm executor runs the stage in-process."""
    monkeypatch.setenv("REPRO_TRACKING", "off")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch either: it must not try
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preset_dict("micro"), sort_keys=False))
    r = CliRunner().invoke(main, ["data", "--params", str(tmp_path / "params.yaml"), "--set", "launcher.executor=slurm"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "digits.npz").is_file()
