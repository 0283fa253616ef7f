"""The Needle-in-a-Haystack cells `kv eval` ran, through NVIDIA kvpress on the same GGUF.

Reads the prompts `kv eval --task niah --niah-prompts FILE` wrote (token ids of the context and of
the question per context length and depth), loads SmolLM2-135M-Instruct from the same GGUF with
transformers, and for each press and compression does what kvpress's pipeline does
(`KVPressTextGenerationPipeline._forward`): prefill the context with the press applied, then feed
the question and decode greedily (at most 32 tokens, stopping at EOS) through the compressed cache,
no further compression. Scores as kv does: the share of expected phrases in the answer. Writes a
JSON and a Markdown table beside the prompts file.

Run (outside the Rust build; needs kvpress==0.5.5, transformers<5.3, accelerate, gguf):
  kv eval --model smollm2 --task niah --context 1024,2048 --policy full --niah-prompts runs/niah-prompts.json
  python reference/kvpress_niah.py --prompts runs/niah-prompts.json
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress import (
    AdaKVPress,
    KeyRerotationPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

# kvpress press -> the kv policy with the same rule and parameters (prefill-only, as the press).
PRESSES = {
    "knorm": (lambda r: KnormPress(compression_ratio=r), "knorm:skip=0"),
    "streaming": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4), "streaming:sinks=4,every=0"),
    "streaming-rerotate": (lambda r: KeyRerotationPress(press=StreamingLLMPress(compression_ratio=r, n_sink=4)), "streaming:sinks=4,every=0,rerotate=true"),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), "snapkv:window=64,kernel=5,pool=avg"),
    "tova": (lambda r: TOVAPress(compression_ratio=r), "tova:every=0"),
    "observed": (lambda r: ObservedAttentionPress(compression_ratio=r), "h2o:recent=0,normalize=true,every=0"),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5), "pyramidkv:window=64,kernel=5,pool=avg"),
    "adakv": (lambda r: AdaKVPress(press=SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)), "adakv:window=64,kernel=5,pool=avg"),
}


def answer(model, context_ids, question_ids, press, eos, max_new=32):
    cache = DynamicCache()
    ctx = torch.tensor([context_ids])
    with torch.inference_mode():
        with press(model) if press is not None else _null():
            model.model(input_ids=ctx, past_key_values=cache)
        # As the pipeline: after re-rotation the question continues at the cache's length.
        n = cache.get_seq_length() if isinstance(press, KeyRerotationPress) else len(context_ids)
        q = torch.tensor([question_ids])
        pos = torch.arange(n, n + q.shape[1]).unsqueeze(0)
        out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
        ids = [int(out.logits[0, -1].argmax())]
        pos = pos[:, -1:] + 1
        for i in range(max_new - 1):
            if ids[-1] in eos:
                break
            out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=pos + i)
            ids.append(int(out.logits[0, -1].argmax()))
    return ids


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", required=True)
    p.add_argument("--gguf", default=os.path.join(os.environ.get("KV_ASSETS", os.path.expanduser("~/.cache/kv-cache")), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--compressions", default="0.5,0.875")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--compare", nargs=2, metavar=("KVPRESS_JSON", "KV_EVAL_JSON"), help="only print the side-by-side table of an earlier run and a kv eval.json")
    a = p.parse_args()
    if a.compare:
        compare(*a.compare)
        return
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = json.load(open(a.prompts))
    folder, name = os.path.split(os.path.abspath(a.gguf))
    # SDPA for every press but ObservedAttentionPress, which needs eager attention's weights.
    # (With PyramidKV's unequal per-layer lengths, eager attention's causal mask for the question
    # does not fit the layers' caches in transformers 5.2; SDPA's does.)
    models = {impl: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation=impl).eval() for impl in ("sdpa", "eager")}
    model = models["sdpa"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    expect = [e.lower() for e in spec["expect"]]
    out = os.path.splitext(a.prompts)[0] + "-kvpress"
    # Presses run again replace their earlier results; the others are kept.
    results = []
    if os.path.exists(out + ".json") and a.presses != ",".join(PRESSES):
        rerun = set(a.presses.split(","))
        results = [r for r in json.load(open(out + ".json"))["results"] if r["press"] not in rerun]
    runs = ([] if results else [("full", 0.0, None)]) + [(n, float(c), PRESSES[n]) for n in a.presses.split(",") for c in a.compressions.split(",")]
    for press_name, ratio, entry in runs:
        for cell in spec["cells"]:
            start = time.perf_counter()
            press = entry[0](ratio) if entry else None
            m = models["eager"] if press_name == "observed" else model
            try:
                ids = answer(m, cell["context_ids"], cell["question_ids"], press, eos)
            except RuntimeError as e:
                print(f"{press_name} {ratio} ctx={cell['context']} depth={cell['depth']}: failed: {e}", flush=True)
                results.append({"press": press_name, "kv_spec": entry[1] if entry else "full", "compression": ratio, "context": cell["context"], "depth": cell["depth"], "score": None, "answer": None, "error": str(e)})
                continue
            text = tok.decode([i for i in ids if i not in eos], skip_special_tokens=True)
            score = sum(e in text.lower() for e in expect) / len(expect)
            results.append({"press": press_name, "kv_spec": entry[1] if entry else "full", "compression": ratio, "context": cell["context"], "depth": cell["depth"], "score": score, "answer": text, "seconds": time.perf_counter() - start})
            print(f"{press_name} {ratio} ctx={cell['context']} depth={cell['depth']}: {score} {text!r}", flush=True)
    runs = [("full", 0.0, None)] + [(n, float(c), PRESSES[n]) for n in PRESSES for c in a.compressions.split(",")]
    with open(out + ".json", "w") as f:
        json.dump({"model": spec["model"], "results": results}, f, indent=1)
    contexts = sorted({c["context"] for c in spec["cells"]})
    lines = ["| press | kv spec | compression | " + " | ".join(f"niah@{c} score" for c in contexts) + " |", "|---|---|---:|" + "---:|" * len(contexts)]
    for press_name, ratio, entry in runs:
        cells = [r for r in results if r["press"] == press_name and r["compression"] == ratio]
        ok = [r for r in cells if r["score"] is not None]
        means = [sum(r["score"] for r in ok if r["context"] == c) / max(1, sum(1 for r in ok if r["context"] == c)) for c in contexts]
        lines.append(f"| {press_name} | `{entry[1] if entry else 'full'}` | {ratio * 100:.1f}% | " + " | ".join(f"{m * 100:.0f}%" for m in means) + " |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(kvpress_json, kv_json):
    """Side by side: per press and compression, both scores at each (context, depth), and the cells
    where they differ."""
    theirs = json.load(open(kvpress_json))["results"]
    ours = json.load(open(kv_json))["results"]
    spec_of = {n: s for n, (_, s) in PRESSES.items()}
    spec_of["full"] = "full"
    lines = ["| press | kv policy | compression | kvpress score | kv score | cells differing (context, depth: kvpress vs kv) |", "|---|---|---:|---:|---:|---|"]
    for name, kv_policy in spec_of.items():
        for c in sorted({r["compression"] for r in theirs if r["press"] == name}):
            t = {(r["context"], r["depth"]): r["score"] for r in theirs if r["press"] == name and r["compression"] == c and r["score"] is not None}
            o = {(r["context"], r["depth"]): r["accuracy"] for r in ours if r["policy"] == kv_policy and abs(r["compression"] - c) < 1e-9 and r["probe"] == "niah"}
            if not o or not t:
                continue
            diff = [f"{k[0]}, {k[1]:.2f}: {t[k]} vs {o[k]}" for k in sorted(t) if k in o and t[k] != o[k]]
            lines.append(f"| {name} | `{kv_policy}` | {c * 100:.1f}% | {100 * sum(t.values()) / len(t):.0f}% | {100 * sum(o.values()) / len(o):.0f}% | {'; '.join(diff) or 'none'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
