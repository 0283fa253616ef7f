"""Writes kv-models/testdata/tiny-qwen3/ (a seeded random Qwen3ForCausalLM in Hugging Face's
format) and kv-models/testdata/tiny-qwen3-logits.safetensors (its logits for 96 input ids), the
reference the Qwen3 loader test compares with.

Needs torch and transformers (any 4.51+ or 5.x); CPU, f32, eager attention:
    python reference/tiny_qwen3.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
import transformers

root = pathlib.Path(__file__).resolve().parent.parent / "kv-models" / "testdata"
out = root / "tiny-qwen3"

torch.manual_seed(0)
config = Qwen3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    # Wider than hidden_size / heads (16), as Qwen3's real models are: the loader must read it.
    head_dim=32,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    use_sliding_window=False,
    # Large weights so attention is far from uniform and the QK-norm's gains matter.
    initializer_range=0.25,
    attn_implementation="eager",
)
model = Qwen3ForCausalLM(config).eval()
# Random (not unit) QK-norm gains, so a loader that skips or misplaces them fails the test.
with torch.no_grad():
    for layer in model.model.layers:
        layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
        layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
model.save_pretrained(out, safe_serialization=True)

ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().contiguous()
save_file(
    {"input_ids": ids.contiguous(), "logits": logits},
    str(root / "tiny-qwen3-logits.safetensors"),
    metadata={
        "about": f"HF transformers {transformers.__version__} Qwen3ForCausalLM (eager, fp32) "
        "logits for input_ids on tiny-qwen3/ (reference/tiny_qwen3.py)"
    },
)
print("wrote", out, "and tiny-qwen3-logits.safetensors; logits", tuple(logits.shape))
