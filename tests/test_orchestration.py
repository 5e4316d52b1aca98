"""Run directories, flow knobs and content keys of the Prefect flow (no Prefect server needed)."""

from __future__ import annotations

import pytest
import yaml

from orca8k.config import load_config
from orca8k.errors import ConfigError
from orca8k.orchestration import content_hash, knob_overrides, prepare_run, stage_fingerprint


def test_knobs_map_to_params_keys_and_none_keeps_the_file_value():
    out = knob_overrides({"learning_rate": 3e-4, "max_length": None, "rope_factor": 2.0}, {"red_pajama": 0.5})
    assert out == {"train.learning_rate": 3e-4, "model.rope_scaling.factor": 2.0, "data.sources.red_pajama.fraction": 0.5}
    with pytest.raises(ConfigError, match="unknown flow parameter"):
        knob_overrides({"lr": 1})


def test_prepare_run_writes_an_isolated_params_file(repo_copy):
    spec = prepare_run("params.yaml", {"train.learning_rate": 1e-3}, "r1", repo_copy)
    assert spec.root == repo_copy / "runs" / "r1" and spec.uses_dvc_mix
    written = yaml.safe_load(spec.params_file.read_text())
    assert written["paths"]["root"] == str(repo_copy / "runs" / "r1")
    assert written["paths"]["data"] == str(repo_copy / "data")
    assert written["paths"]["mix"] == str(repo_copy / "artifacts" / "mix")  # the DVC-versioned mix is shared
    cfg = load_config(spec.params_file)
    assert cfg.train.learning_rate == 1e-3
    assert cfg.paths.resolve("model") == repo_copy / "runs" / "r1" / "artifacts" / "model"
    other = prepare_run("params.yaml", {"data.sources.red_pajama.fraction": 0.5}, "r2", repo_copy)
    assert not other.uses_dvc_mix  # a changed mix is built inside the run
    assert other.config.paths.resolve("mix") == repo_copy / "runs" / "r2" / "artifacts" / "mix"


def test_prepare_run_rejects_bad_names_and_keys(repo_copy):
    with pytest.raises(ConfigError, match="run name"):
        prepare_run("params.yaml", {}, "../escape", repo_copy)
    with pytest.raises(ConfigError, match="unknown key"):
        prepare_run("params.yaml", {"train.lerning_rate": 1}, "ok", repo_copy)
    assert not (repo_copy / "runs" / "ok").exists()


def test_content_hash_follows_content_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.txt").write_text("same")
    assert content_hash(a) == content_hash(b)
    (b / "sub" / "x.txt").write_text("different")
    assert content_hash(a) != content_hash(b)
    assert content_hash(tmp_path / "nope") == "missing"


def test_stage_fingerprint_changes_with_the_params_a_stage_reads_only(repo_copy, monkeypatch):
    monkeypatch.chdir(repo_copy)
    base = load_config(repo_copy / "params.yaml")
    fp = stage_fingerprint("mix", base, repo_copy)
    assert stage_fingerprint("mix", load_config(repo_copy / "params.yaml", ["train.learning_rate=1"]), repo_copy) == fp
    assert stage_fingerprint("mix", load_config(repo_copy / "params.yaml", ["data.val_split=0.3"]), repo_copy) != fp
    (repo_copy / "data").mkdir(exist_ok=True)
    (repo_copy / "data" / "new.jsonl").write_text("{}\n")
    assert stage_fingerprint("mix", base, repo_copy) != fp


# ------------------------------------------------------------------------------------- supervised children
_CHILD = """
import json, os, signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def stop(signum, frame):  # like torchrun: a launcher stops its workers on SIGTERM
    grandchild.terminate(); grandchild.wait(); sys.exit(143)
if sys.argv[2] == "launcher":
    signal.signal(signal.SIGTERM, stop)
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"child": os.getpid(), "grandchild": grandchild.pid, "pgid": os.getpgid(0)}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""
_PARENT = """
import sys
from orca8k.training.supervise import run_supervised
run_supervised([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], grace_seconds=5)
"""


def _alive(pid: int) -> bool:
    from orca8k.orchestration import _pid_alive

    return _pid_alive(pid)


def _start_parent(tmp_path, mode: str):
    import subprocess
    import sys
    import time

    from tests.fixtures.common import cli_env

    (tmp_path / "child.py").write_text(_CHILD)
    (tmp_path / "parent.py").write_text(_PARENT)
    pids_file = tmp_path / "pids.json"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"),
                               str(pids_file), mode], env=cli_env())
    deadline = time.monotonic() + 60
    while not pids_file.exists():
        assert parent.poll() is None, f"parent exited {parent.returncode}"
        assert time.monotonic() < deadline, "the child never wrote its pids"
        time.sleep(0.05)
    import json

    return parent, json.loads(pids_file.read_text())


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill_leftovers(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_run_supervised_sigterm_to_parent_kills_child_and_grandchild(tmp_path):
    import os
    import signal

    parent, pids = _start_parent(tmp_path, "plain")  # a child that ignores its workers on SIGTERM
    procs = [pids["child"], pids["grandchild"]]
    try:
        assert pids["pgid"] == pids["child"] != os.getpgid(parent.pid)  # the child leads its own group
        assert all(_alive(p) for p in procs)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert _wait_gone(procs, 5) == []  # the whole group went, not just the child
    finally:
        _kill_leftovers([parent.pid, *procs])


def test_run_supervised_child_dies_with_a_killed_parent(tmp_path):
    import signal

    parent, pids = _start_parent(tmp_path, "launcher")
    procs = [pids["child"], pids["grandchild"]]
    try:
        parent.send_signal(signal.SIGKILL)  # no handler runs: PR_SET_PDEATHSIG sends the child SIGTERM
        assert parent.wait(timeout=30) == -signal.SIGKILL
        assert _wait_gone(procs, 10) == []
    finally:
        _kill_leftovers(procs)


def test_run_supervised_returns_output_or_raises_with_the_exit_code():
    import subprocess
    import sys

    from orca8k.training.supervise import run_supervised

    done = run_supervised([sys.executable, "-c", "print('ok')"], capture_stdout=True)
    assert (done.returncode, done.stdout) == (0, "ok\n")
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_supervised([sys.executable, "-c", "import sys; print('partial'); sys.exit(3)"], capture_stdout=True)
    assert (err.value.returncode, err.value.output) == (3, "partial\n")


# ------------------------------------------------------------------------------------------- cache locks
def test_lock_left_by_a_dead_process_is_stale_and_a_live_one_holds(tmp_path):
    import json
    import subprocess
    import sys

    from orca8k.orchestration import ProcessFileLockManager

    locks = tmp_path / "locks"
    first = ProcessFileLockManager(locks)
    assert first.acquire_lock("base-shared-abc", holder="h1")
    info = json.loads((locks / "base-shared-abc.lock").read_text())
    assert info["holder"] == "h1" and info["pid"] == __import__("os").getpid()
    other = ProcessFileLockManager(locks)  # another process's view of the same directory
    assert other.is_locked("base-shared-abc") and not other.acquire_lock("base-shared-abc", "h2", acquire_timeout=0.3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info["pid"] = int(dead.stdout)  # as if the holder had been killed with SIGKILL
    (locks / "base-shared-abc.lock").write_text(json.dumps(info))
    assert not other.is_locked("base-shared-abc")
    assert not (locks / "base-shared-abc.lock").exists()
    assert other.acquire_lock("base-shared-abc", "h2", acquire_timeout=0.3)
    other.release_lock("base-shared-abc", "h2")
    assert not (locks / "base-shared-abc.lock").exists()
