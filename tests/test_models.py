"""The default model's one-time conversion when several processes ask for it at once."""

import os
import subprocess
import sys

SCRIPT = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
    "from agro_dist.io.models import default_model_path\n"
    "from transformers import AutoConfig\n"
    "p = default_model_path(); AutoConfig.from_pretrained(p); print('PATH', p)\n"
)


def test_concurrent_first_use_gives_everyone_the_same_complete_folder(tmp_path):
    # Three processes on an empty cache: before the lock, the losers failed with
    # "OSError: [Errno 39] Directory not empty" from the final rename.
    env = dict(os.environ, AGRO_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-2000:]
    paths = {line.split(" ", 1)[1] for out in outs for line in out.splitlines() if line.startswith("PATH ")}
    assert paths == {str(tmp_path / "smollm2-135m-instruct")}
    assert sum(out.count("converting") for out in outs) == 1  # one converted, the others waited
    assert sorted(os.listdir(tmp_path)) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]  # no temporary left
    assert os.path.getsize(tmp_path / "smollm2-135m-instruct" / "model.safetensors") > 500e6


def test_a_hub_id_where_the_hub_cannot_be_reached_fails_before_ray_with_what_to_do(tmp_path, monkeypatch):
    import subprocess
    import sys

    import pytest

    from agro_dist.io.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(FileNotFoundError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct' is not a local folder, and it cannot be "
                                                r"fetched: the hub is not reachable \(HF_HUB_OFFLINE is set\).*Pass a local"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="model folder not found: ./nowhere"):
        resolve_model("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    # The command line: exit 3 before any Ray starts, with the message.
    p = subprocess.run([sys.executable, "-m", "agro_dist", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--run.steps", "1",
                        "--run.output_dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 3 and "cannot be fetched" in out and "Pass a local Hugging Face folder" in out, out[-3000:]
    assert "local Ray" not in out, out[-3000:]
