"""Shared fixtures: one real Redis server per test session (no mocks), a fresh buffer name per test."""

import itertools
import os

import pytest
import torch

from agro_dist.buffer import RedisServer, ReplayBuffer

_names = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(str(tmp_path_factory.mktemp("redis")), appendfsync="everysec").start()
    yield server
    server.stop()


@pytest.fixture
def make_buffer(redis_server):
    """Buffers on the session's server, each test under its own key prefix; keys removed after."""
    made = []

    def make(name=None, url=None, **cfg):
        name = name or f"t{os.getpid()}-{next(_names)}"
        buf = ReplayBuffer(url or redis_server.url, name=name, **cfg)
        made.append(buf)
        return buf

    yield make
    for b in made:
        b.delete()
        b.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-init Llama small enough to train in milliseconds, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory):
    """A random-init Llama vLLM's CPU kernels accept (head_dim 64), with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from agro_dist.io.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = str(tmp_path_factory.mktemp("tiny-vllm"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API on 127.0.0.1: moto's server (PyPI ``moto[server]``), started and stopped here.

    Yields ``{"env": AWS variables for clients, "uri": lambda bucket, prefix: a storage URI}``;
    the credentials are moto's fixed test keys, also set in this process for pyarrow."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.3)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")

        def uri(bucket: str, prefix: str = "") -> str:
            if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=bucket)
            return f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1".replace("/?", "?")

        yield {"env": env, "uri": uri, "client": client, "port": port}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def short_tmp():
    """A short temporary folder, removed afterwards: for TMPDIR of processes that put sockets in it
    (vLLM's ipc:// paths must fit AF_UNIX's 107 bytes, which tmp_path's long names may not)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="agt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
