"""Load a model folder with transformers and with vLLM, given nothing but the folder, and print
both greedy completions of one chat prompt as JSON (run in a subprocess: one vLLM engine per process).

    python tests/hf_folder_check.py FOLDER
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
hf = out[0, ids.shape[1]:].tolist()

from vllm import LLM, SamplingParams  # noqa: E402

llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.5)
res = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0]
vl = list(res.token_ids)
print("HF_FOLDER_CHECK " + json.dumps({"hf": hf, "vllm": vl, "text": res.text, "chat_template": bool(tok.chat_template)}))
