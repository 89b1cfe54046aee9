"""run.storage_path: runs and checkpoints in a local folder or on a real S3 API (moto's server on
127.0.0.1), atomic without rename, a process killed mid-upload, a full disk. The jobs that use
it end to end are in test_system.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agro_dist.io.storage import CheckpointWriteError, Storage, display, fetch_checkpoint, join, latest_checkpoint
from learner_worker import batch_for_step, make_learner

HERE = os.path.dirname(os.path.abspath(__file__))


def test_join_keeps_the_query_and_display_drops_it():
    uri = "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join(uri, "x", "checkpoints") == "s3://b/runs/x/checkpoints?endpoint_override=127.0.0.1:9000&scheme=http"
    assert display(join(uri, "x")) == "s3://b/runs/x"
    assert join("/a/b", "c") == "/a/b/c" and display("file:///a/b") == "/a/b"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_writes_reads_lists_copies_and_deletes(where, tmp_path, s3_server):
    root = str(tmp_path / "store") if where == "local" else s3_server["uri"]("ops", "runs")
    st = Storage(join(root, "r1"))
    assert not st.exists() and st.files() == {}
    st.write_text("latest", "step_1")
    assert st.read_text("latest") == "step_1" and st.exists("latest")
    src = tmp_path / "src"
    (src / "hf").mkdir(parents=True)
    (src / "hf" / "w.bin").write_bytes(b"x" * 1000)
    (src / "meta.json").write_text("{}")
    (src / "skip.txt").write_text("no")
    (src / "hf" / "secret.conf").write_text("requirepass x")
    import socket  # a live unix socket in the folder (the private Redis keeps one in the run's redis/): not uploaded

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "hf" / "redis.sock"))
    assert st.upload(str(src), "step_1", names=["hf", "meta.json"], skip=("hf/secret.conf",)) == {"hf/w.bin": 1000, "meta.json": 2}
    assert st.files("step_1") == {"hf/w.bin": 1000, "meta.json": 2}
    sock.close()
    got = tmp_path / "got"
    assert sorted(st.download("step_1", str(got))) == ["hf/w.bin", "meta.json"]
    assert (got / "hf" / "w.bin").read_bytes() == b"x" * 1000
    whole = tmp_path / "whole"  # the run's top level, as a resumed driver downloads it
    assert sorted(st.download("", str(whole), names=["latest", "step_1"])) == ["latest", "step_1/hf/w.bin", "step_1/meta.json"]
    st.delete("step_1")
    assert not st.exists("step_1") and st.files() == {"latest": 6}


def test_learner_checkpoint_on_s3_loads_back_and_is_checked_against_its_manifest(tiny_model, tmp_path, s3_server, monkeypatch):
    root = s3_server["uri"]("ckpt", "run/checkpoints")
    learner = make_learner(tiny_model, zero_stage=2)
    learner.train_step(batch_for_step(0, 4))
    assert learner.save_checkpoint(root, extra={"step": 1}) == join(root, "step_00000001")
    assert latest_checkpoint(root) == "step_00000001"
    st = Storage(root)
    manifest = json.loads(st.read_text("step_00000001/manifest.json"))["files"]
    assert {"meta.json", "rng_rank0.pt", "hf/model.safetensors", "hf/README.md", "hf/config.json"} <= set(manifest)
    assert any(k.startswith("ds/") for k in manifest)
    _, sd = learner.publish()
    other = make_learner(tiny_model, zero_stage=2)
    assert other.load_checkpoint(root)["extra"] == {"step": 1}
    assert all(torch.equal(v, sd[k]) for k, v in other.publish()[1].items())
    # The Hugging Face folder, downloaded as a user would, loads with transformers.
    local, name = fetch_checkpoint(root)
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(local, "hf"))
    assert all(torch.equal(v, sd[k]) for k, v in hf.state_dict().items() if k in sd)
    shutil.rmtree(local)  # the caller's to remove
    # python -m agro_dist.evaluate takes the bucket's hf/ and config.yaml: local copies first.
    from agro_dist.io.storage import fetch

    got = fetch(join(root, "step_00000001", "hf"))
    assert sorted(os.listdir(got)) == sorted(k.split("/", 1)[1] for k in manifest if k.startswith("hf/"))
    meta = fetch(join(root, "step_00000001", "meta.json"))
    assert open(meta).read() == st.read_text("step_00000001/meta.json")
    shutil.rmtree(got), shutil.rmtree(os.path.dirname(meta))
    # ... and removes them when it ends, here at its config error (a model's copy is as large as its weights).
    from agro_dist import evaluate

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    hf_uri, meta_uri = join(root, "step_00000001", "hf"), join(root, "step_00000001", "meta.json")
    assert evaluate.main(["--model", hf_uri, "--config", meta_uri, "--run.mode", "bogus"]) == 2
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(FileNotFoundError, match="not found"):
        fetch(join(root, "step_00000009"))
    # The final model card is rewritten in place and the manifest follows it.
    learner.update_model_card(root, {"after": {"version": 1, "greedy_accuracy": 0.5, "sampled_accuracy": 0.25, "eval_problems": 4}})
    assert "25.0%" in st.read_text("step_00000001/hf/README.md")
    make_learner(tiny_model, zero_stage=2).load_checkpoint(root)
    # A checkpoint with a file missing is refused, naming the file.
    s3_server["client"].delete_object(Bucket="ckpt", Key="run/checkpoints/step_00000001/rng_rank0.pt")
    with pytest.raises(FileNotFoundError, match="rng_rank0.pt"):
        make_learner(tiny_model, zero_stage=2).load_checkpoint(root)


def _run(args, tmp):
    # TMPDIR: a learner killed mid-upload leaves its local copy of the checkpoint behind, here in pytest's folder.
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(HERE, "learner_worker.py"), *args], capture_output=True, text=True, env=env, timeout=300)


def test_killed_half_way_through_an_upload_resumes_from_the_previous_checkpoint_bitwise(tiny_model, tmp_path, s3_server):
    # The reference: five steps, no crash, checkpoints on local disk.
    common = ["--steps", "5", "--zero", "2", "--checkpoint-at", "2", "4"]
    full = _run([tiny_model, str(tmp_path / "full"), *common], str(tmp_path))
    assert full.returncode == 0, full.stderr[-3000:]
    root = s3_server["uri"]("kill", "run/checkpoints")
    crashed = _run([tiny_model, str(tmp_path / "crash"), *common, "--ckpt", root, "--kill-in-upload", "4"], str(tmp_path))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    st = Storage(root)
    partial = st.files("step_00000004")
    assert len(partial) == 3 and "manifest.json" not in partial  # three files made it, then the process died
    assert latest_checkpoint(root) == "step_00000002"  # what a reader sees: the previous, complete checkpoint
    resumed = _run([tiny_model, str(tmp_path / "crash"), *common, "--ckpt", root, "--resume"], str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (2, 3, 4):
        a = load_file(str(tmp_path / "full" / f"params_{step}.safetensors"))
        b = load_file(str(tmp_path / "crash" / f"params_{step}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs after resume"
    assert latest_checkpoint(root) == "step_00000004"  # rewritten whole over the partial upload
    assert set(st.files("step_00000004")) == set(json.loads(st.read_text("step_00000004/manifest.json"))["files"]) | {"manifest.json"}


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("AGRO_CI"), reason="mounting a tmpfs needs root (CI runs as root; there it fails without)")
def test_a_full_disk_leaves_the_previous_checkpoint_intact_and_says_so(tiny_model, tmp_path):
    learner = make_learner(tiny_model, zero_stage=2)
    learner.train_step(batch_for_step(0, 4))
    probe = learner.save_checkpoint(str(tmp_path / "probe"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(probe) for f in fs)
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for one checkpoint and a half: the second one runs out of space half-way.
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 4096}", "tmpfs", str(disk)], check=True)
    try:
        root = str(disk / "checkpoints")
        learner.save_checkpoint(root)
        learner.train_step(batch_for_step(1, 4))
        with pytest.raises(CheckpointWriteError, match=r"step_00000002 could not be written to .*disk/checkpoints.*MB free on its disk\); "
                                                       r"the previous checkpoint step_00000001 is intact"):
            learner.save_checkpoint(root)
        assert sorted(os.listdir(root)) == ["latest", "step_00000001"]  # the partial copy is gone
        assert make_learner(tiny_model, zero_stage=2).load_checkpoint(root)["version"] == 1
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:  # a handle the failed write left open
            subprocess.run(["umount", "-l", str(disk)], check=False)
