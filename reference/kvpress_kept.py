"""Which positions NVIDIA kvpress keeps, per (layer, KV head), for kv-models' agreement tests.

Runs kvpress's KnormPress, StreamingLLMPress, SnapKVPress, TOVAPress and ObservedAttentionPress at
compression 0.5 on two prompts and writes kv-models/testdata/kvpress-kept.json:

  tiny-llama  the golden 96 input ids of kv-models/testdata/tiny-llama-logits.safetensors, on the
              HF checkpoint kv-models/testdata/tiny-llama
  smollm2     the golden "long" case (the first 1024 tokens of the essay addiction.txt), on
              SmolLM2-135M-Instruct read by transformers from the Q4_1 GGUF (run
              scripts/fetch-assets.sh first)

kvpress compresses the cache in place and does not expose the indices, so they are recovered by
matching: a prefill with the press and one without compute the same keys (a press changes the
cache, never the activations of the prompt), so every kept key row is found, bit for bit, among
the uncompressed rows. Kept positions are stored as hex bitmasks, one per KV head.

Run (outside the Rust build; its output is committed):
  python -m venv venv && venv/bin/pip install "kvpress==0.5.5" "transformers==5.2.0" gguf safetensors
  venv/bin/python reference/kvpress_kept.py
"""

import json
import os

import torch
import transformers
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

import kvpress
from kvpress import KnormPress, ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "kv-models", "testdata")
ASSETS = os.environ.get("KV_ASSETS", os.path.expanduser("~/.cache/kv-cache"))
RATIO = 0.5

# Each press with the kv policy spec that should keep the same positions (kvpress's parameters).
PRESSES = {
    "knorm": (lambda: KnormPress(compression_ratio=RATIO), "knorm:budget=0.5,skip=0"),
    "streaming": (lambda: StreamingLLMPress(compression_ratio=RATIO, n_sink=4), "streaming:budget=0.5,sinks=4"),
    "snapkv": (lambda: SnapKVPress(compression_ratio=RATIO, window_size=64, kernel_size=5), "snapkv:budget=0.5,window=64,kernel=5,pool=avg"),
    "tova": (lambda: TOVAPress(compression_ratio=RATIO), "tova:budget=0.5"),
    "observed": (lambda: ObservedAttentionPress(compression_ratio=RATIO), "h2o:budget=0.5,recent=0,normalize=true"),
}


def layer_keys(cache, layer):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys
    return cache.key_cache[layer]


def kept_positions(model, input_ids, press):
    with torch.inference_mode():
        full = model(input_ids, use_cache=True).past_key_values
        with press(model):
            pressed = model(input_ids, use_cache=True).past_key_values
    out = []
    for layer in range(model.config.num_hidden_layers):
        k_full, k_kept = layer_keys(full, layer)[0], layer_keys(pressed, layer)[0]
        heads = []
        for h in range(k_full.shape[0]):
            rows = {tuple(r.tolist()): j for j, r in enumerate(k_full[h])}
            positions = sorted(rows[tuple(r.tolist())] for r in k_kept[h])
            assert len(set(positions)) == len(positions), "kept rows must be distinct positions"
            mask = 0
            for p in positions:
                mask |= 1 << p
            heads.append(format(mask, "x"))
        out.append(heads)
    return out


def main():
    torch.manual_seed(0)
    cases = {}
    golden = load_file(os.path.join(TESTDATA, "tiny-llama-logits.safetensors"))
    tiny = AutoModelForCausalLM.from_pretrained(os.path.join(TESTDATA, "tiny-llama"), dtype=torch.float32, attn_implementation="eager").eval()
    cases["tiny-llama"] = (tiny, torch.tensor(golden["input_ids"]))
    gguf = os.path.join(ASSETS, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(gguf):
        smol = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=os.path.basename(gguf), dtype=torch.float32, attn_implementation="eager").eval()
        ids = load_file(os.path.join(TESTDATA, "smollm2-golden.safetensors"))["long.input_ids"]
        cases["smollm2"] = (smol, torch.tensor(ids).reshape(1, -1))
    result = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5", "transformers": transformers.__version__, "torch": torch.__version__, "compression": RATIO, "cases": {}}
    for name, (model, ids) in cases.items():
        result["cases"][name] = {"tokens": ids.shape[1], "presses": {}}
        for press_name, (make, spec) in PRESSES.items():
            result["cases"][name]["presses"][press_name] = {"spec": spec, "kept": kept_positions(model, ids, make())}
            print(f"{name} {press_name}: done")
    path = os.path.join(TESTDATA, "kvpress-kept.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
