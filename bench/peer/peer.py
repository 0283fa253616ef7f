"""`kv bench` against HF transformers (and kvpress for the compressed cells) on the same model, in one run.

Two models:
  decode-bench  the preset of that name (d 256, 8 heads, 4 layers, ffn 1024, vocab 256, random
                weights): HF builds the same LlamaConfig with its own random weights, since speed
                does not depend on the values;
  smollm2       SmolLM2-135M-Instruct from the GGUF scripts/fetch-assets.sh fetches, de-quantised
                to f32 on both sides; kv's decode steps multiply by the file's own Q4_1/Q8_0 codes
                (the same weights, a fifth of the bytes), and each cell also runs with
                `--f32-weights`, decoding on the f32 weights as HF does.

Every cell (one context, one method) runs in a fresh process on each side, so the peak RSS printed
is that cell's own (the whole process: for HF that includes Python and torch). A cell prefills
`context` tokens (the same deterministic stream on both sides), then times `--steps` decode steps
after two warm-up steps. Methods: `full`, and kvpress's SnapKV / StreamingLLM at each compression
ratio, which both compress once at prefill; ours run the same (`snapkv:budget=1-r`,
`streaming:budget=1-r,every=0`). torch gets the same thread count as burn's pool.

Prints one Markdown table of both sides and their ratios, and writes it with the raw numbers as
JSON (`<out>/<model>.md`, `<out>/<model>.json`).

Run (outside the Rust build; needs torch, transformers<5.3, kvpress, and for smollm2 gguf and
accelerate, all from PyPI):
  cargo build --release -p kv-cli && scripts/fetch-assets.sh
  python bench/peer/peer.py --model decode-bench --kv "$CARGO_TARGET_DIR/release/kv" --contexts 512,2048,8192
  python bench/peer/peer.py --model smollm2 --kv "$CARGO_TARGET_DIR/release/kv" --contexts 1024,4096 --methods full
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DECODE_BENCH = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=1024, rope_theta=10000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def ids_for(n):
    # The same deterministic stream `kv bench` prefills (kv-cli/src/bench.rs).
    return [32 + (i * 7 + i // 13) % 90 for i in range(n)]


def gguf_path():
    return os.path.join(os.environ.get("KV_ASSETS", os.path.expanduser("~/.cache/kv-cache")), "SmolLM2-135M-Instruct.Q4_1.gguf")


def method_parts(method):
    """`full`, `snapkv@0.5`, `streaming@0.875` -> (name, compression ratio)."""
    if method == "full":
        return "full", 0.0
    name, ratio = method.split("@")
    return name, float(ratio)


def kv_spec(method):
    name, ratio = method_parts(method)
    if name == "full":
        return "full"
    budget = f"{1.0 - ratio:g}"
    return {"snapkv": f"snapkv:budget={budget}", "streaming": f"streaming:budget={budget},every=0"}[name]


def hf_cell(model_name, context, method, steps, threads):
    """One HF measurement in this process: prefill `context` tokens (through a kvpress press for a
    compressed method), then `steps` decode steps at the right positions."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if model_name == "decode-bench":
        config = transformers.LlamaConfig(**DECODE_BENCH, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    else:
        folder, name = os.path.split(gguf_path())
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    name, ratio = method_parts(method)
    press = None
    if name != "full":
        import kvpress
        press = {"snapkv": kvpress.SnapKVPress, "streaming": kvpress.StreamingLLMPress}[name](compression_ratio=ratio)
    x = torch.tensor([ids_for(context)])
    with torch.inference_mode():
        model(x[:, :16], use_cache=True)  # warm-up
        cache = transformers.DynamicCache()
        start = time.perf_counter()
        if press is None:
            out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            with press(model):
                out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        position = context
        timed = 0.0
        for i in range(steps + 2):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, position_ids=torch.tensor([[position]]), use_cache=True)
            if i >= 2:
                timed += time.perf_counter() - start
            token, position = out.logits[:, -1:].argmax(-1), position + 1
        slots = cache.get_seq_length()
    return {"prefill_s": prefill, "decode_tokens_per_s": steps / timed, "slots": slots,
            "versions": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def run_measured(cmd, env=None):
    """Runs `cmd` to completion; returns (stdout, peak RSS of that process in MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-4000:]}")
        out.seek(0)
        return out.read().decode(), usage.ru_maxrss / 1024


def kv_cell(kv, model_name, context, method, steps, threads, scratch, extra=()):
    folder = os.path.join(scratch, f"{method.replace('@', '-')}-{context}{'-'.join(('',) + tuple(extra))}")
    source = ["--preset", "decode-bench"] if model_name == "decode-bench" else ["--model", gguf_path()]
    cmd = [kv, "bench", *source, *extra, "--contexts", str(context), "--policy", kv_spec(method), "--prefill", "--no-roofline", "--steps", str(steps), "--out", folder]
    _, rss = run_measured(cmd, env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    cell = json.load(open(os.path.join(folder, "bench.json")))["decode"][0]
    return {"prefill_s": cell["prefill_ms"] / 1e3, "decode_tokens_per_s": cell["tokens_per_s"], "slots": cell["slots"],
            "prefill_peak_heap_mib": cell.get("prefill_peak_mib"), "peak_rss_mib": rss}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["decode-bench", "smollm2"], default="decode-bench")
    p.add_argument("--kv", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "kv"))
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--methods", default="full,snapkv@0.5,snapkv@0.875,streaming@0.5,streaming@0.875",
                   help="full, or snapkv@R / streaming@R with R the compression ratio (share removed)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps; kv bench rounds a policy cell up to whole compaction cycles of 64")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="runs/peer")
    p.add_argument("--hf-cell", nargs=2, metavar=("CONTEXT", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_cell:
        print(json.dumps(hf_cell(a.model, int(a.hf_cell[0]), a.hf_cell[1], a.steps, a.threads)))
        return
    contexts = [int(c) for c in a.contexts.split(",")]
    methods = a.methods.split(",")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    versions = ""
    with tempfile.TemporaryDirectory() as scratch:
        for context in contexts:
            for method in methods:
                print(f"{a.model} {method} at {context}", file=sys.stderr)
                ours = kv_cell(a.kv, a.model, context, method, a.steps, a.threads, scratch)
                out, rss = run_measured([sys.executable, __file__, "--model", a.model, "--steps", str(a.steps), "--threads", str(a.threads), "--hf-cell", str(context), method])
                theirs = json.loads(out.strip().splitlines()[-1])
                theirs["peak_rss_mib"] = rss
                versions = theirs.pop("versions")
                row = {"context": context, "method": method, "kv": ours, "hf": theirs}
                if a.model == "smollm2":
                    row["kv_f32_weights"] = kv_cell(a.kv, a.model, context, method, a.steps, a.threads, scratch, ["--f32-weights"])
                rows.append(row)
    title = {"decode-bench": "decode-bench (d 256, 8 heads, 4 layers, random weights)",
             "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to f32; kv decodes on its codes, and on f32 in the last columns)"}[a.model]
    md = [
        f"{title}, batch 1, {a.threads} threads; kv: flex backend; HF: {versions}, SDPA; compressed cells: kvpress presses at prefill.",
        "Ratios are kv / HF: below 1 is faster for prefill time and memory, above 1 is faster for decode.",
        "",
        "| context | method | kv prefill s | HF prefill s | prefill kv/HF | kv decode tok/s | HF decode tok/s | decode kv/HF | kv peak RSS MiB | HF peak RSS MiB | RSS kv/HF | slots kv / HF |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    f32 = any("kv_f32_weights" in r for r in rows)
    if f32:
        md[-2] += " kv f32-weights decode tok/s | decode kv f32/HF | kv f32-weights peak RSS MiB |"
        md[-1] += "---:|---:|---:|"
    for r in rows:
        o, t = r["kv"], r["hf"]
        line = (
            f"| {r['context']} | {r['method']} | {o['prefill_s']:.3f} | {t['prefill_s']:.3f} | {o['prefill_s'] / t['prefill_s']:.2f}x "
            f"| {o['decode_tokens_per_s']:.1f} | {t['decode_tokens_per_s']:.1f} | {o['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x "
            f"| {o['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | {o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x | {o['slots']} / {t['slots']} |"
        )
        if f32:
            w = r["kv_f32_weights"]
            line += f" {w['decode_tokens_per_s']:.1f} | {w['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x | {w['peak_rss_mib']:.0f} |"
        md.append(line)
    text = "\n".join(md)
    print(text)
    with open(os.path.join(a.out, f"{a.model}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, f"{a.model}.json"), "w") as f:
        json.dump({"model": a.model, "threads": a.threads, "steps": a.steps, "versions": versions, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
