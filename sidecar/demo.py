"""`python -m sidecar demo`: a scripted session through the real protocol, printed as it happens.

It spawns `python -m sidecar` like a host app would and walks what exists so far: the handshake,
the model pool with the built-in model, a quick LoRA fine-tune, merging it, exporting the merged
model to a Q4_K_M GGUF with its Ollama Modelfile in one request and generating from that file
through llama.cpp, the registry, and a long job with progress and cancel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from protocol.version import PROTOCOL_VERSION
from sidecar.call import TerminalView
from sidecar.client import SidecarProcess


def show(title: str, request: dict[str, Any] | None = None) -> None:
    print(f"\n== {title}")
    if request is not None:
        print("-> " + json.dumps(request))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def artifact_bytes(result: dict[str, Any]) -> int:
    return sum(f["size_bytes"] for f in result["files"]) if result.get("files") else result["artifact"]["size_bytes"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar demo", description=__doc__)
    parser.add_argument("--model", default="builtin:tiny", help="model reference to load (default builtin:tiny)")
    args = parser.parse_args(argv)
    view = TerminalView()
    env = dict(os.environ)
    env.setdefault("MLSIDECAR_LOG_LEVEL", "WARNING")
    data_dir = Path(__file__).resolve().parents[1] / "runtimes" / "data"
    with SidecarProcess(["--debug", "--allow-root", str(data_dir)], env=env) as sidecar:
        def call(method: str, params: dict[str, Any] | None = None) -> Any:
            show(method, {"method": method, "params": params or {}})
            result = sidecar.request(method, params, on_event=view.event)
            view.end()
            return result

        started = time.perf_counter()
        info = call("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "demo"}, "processId": os.getpid()})
        server = info["serverInfo"]
        print(f"<- {server['name']} {server['version']} (pid {server['pid']}, python {server['python']}, torch {server['torch']}, "
              f"llama.cpp {server['llama_cpp']}), protocol {info['protocolVersion']}, answered {time.perf_counter() - started:.2f}s after spawn")
        print(f"   methods: {', '.join(info['capabilities']['methods'])}")

        t0 = time.perf_counter()
        for _ in range(100):
            sidecar.request("ping")
        show("ping x100")
        print(f"<- mean round trip {(time.perf_counter() - t0) * 10:.2f} ms")

        loaded = call("models/load", {"model": args.model, "keep_alive": "10m"})
        print(f"<- {loaded['model']} on {loaded['device']} ({loaded['dtype']}), {mib(loaded['memory_bytes'])}, path {loaded['path']}")
        if args.model == "builtin:tiny":
            print("   (builtin:tiny is a 197k-parameter model trained for seconds on a small corpus: it makes words, "
                  "not sense. Pass --model with a real model to see real text.)")

        show("generate, streamed", {"method": "generate", "params": {"model": args.model, "prompt": "Once upon a time, a clever fox",
                                                                      "max_tokens": 48, "temperature": 0}})
        print("<- ", end="", flush=True)
        result = sidecar.request("generate", {"model": args.model, "prompt": "Once upon a time, a clever fox",
                                              "max_tokens": 48, "temperature": 0}, on_event=view.event)
        view.end()
        timings = result["timings"]
        print(f"<- finish_reason={result['finish_reason']} {result['usage']['completion_tokens']} tokens, "
              f"{timings['tokens_per_s']:.0f} tokens/s, first token after {timings['ttft_ms']:.0f} ms")

        chat = {"model": args.model, "messages": [{"role": "user", "content": "Tell me about the fox."}],
                "max_tokens": 32, "temperature": 0.7, "seed": 1, "stop": ["\n\n"]}
        show("generate, chat with a seed and a stop string", {"method": "generate", "params": chat})
        print("<- ", end="", flush=True)
        result = sidecar.request("generate", chat, on_event=view.event)
        view.end()
        print(f"<- finish_reason={result['finish_reason']} seed={result['seed']}")

        texts = ["A fox flattered a crow.", "The crow dropped its cheese.", "The tortoise won the race."]
        embedded = call("embed", {"model": args.model, "input": texts})
        vectors = embedded["embeddings"]
        similarity = sum(a * b for a, b in zip(vectors[0], vectors[1]))
        print(f"<- {embedded['count']} vectors of {embedded['dimensions']} ({embedded['pooling']} pooling); "
              f"cosine(fox/crow, crow/cheese) = {similarity:.3f}")

        dataset = str(data_dir / "demo_chat.jsonl")
        inspected = call("datasets/inspect", {"data": dataset, "model": args.model, "samples": 1})
        stats = inspected["tokens"]
        print(f"<- {inspected['format']} data, {inspected['valid_rows']}/{inspected['rows']} usable rows, "
              f"{stats['min']}-{stats['max']} tokens (mean {stats['mean']:.0f}), {stats['trained_tokens']} trained")
        print("   first row as the model sees it: " + json.dumps(inspected["samples"][0]["rendered"])[:160])

        trained = call("train", {"model": args.model, "data": dataset, "preset": "quick"})
        metrics = trained["metrics"]
        print(f"<- {trained['artifact']['kind']} {trained['artifact']['id']}: {metrics['steps']} steps, train loss "
              f"{metrics['train_loss']:.3f}, validation loss {metrics['val_loss']:.3f}, {metrics['tokens_per_s']:.0f} tokens/s")
        print(f"   loss curve: {trained['files']['loss_curve_png']}")

        question = {"model": args.model, "messages": [{"role": "user", "content": "What is a good way to start the morning?"}],
                    "max_tokens": 40, "temperature": 0}
        for label, extra in (("base", {}), ("with the adapter", {"adapters": [{"adapter": trained["artifact"]["id"]}]})):
            show(f"generate, {label}", {"method": "generate", "params": {**question, **extra}})
            answer = sidecar.request("generate", {**question, **extra, "stream": False})
            print(f"<- {json.dumps(answer['text'])}")

        merged = call("merge_lora", {"model": args.model, "adapters": [{"adapter": trained["artifact"]["id"]}]})
        check = merged["verification"]
        print(f"<- model {merged['artifact']['id']}: {merged['merged_tensors']} of {merged['tensors']} tensors merged"
              + (f", max |logit difference| to the unmerged adapter {check['max_abs_logit_diff']:.2e}" if check else ""))

        exported = call("export", {"model": merged["artifact"]["id"], "format": "gguf", "quantization": "Q4_K_M",
                                   "system": "You are a helpful assistant."})
        model_file = next(f for f in exported["files"] if f["role"] == "model")
        print(f"<- {exported['quantization']} GGUF (from {exported['outtype']}) {mib(model_file['size_bytes'])} in "
              f"{exported['seconds']:.1f}s: {exported['path']}")
        for warning in exported["warnings"]:
            print(f"   warning: {warning}")
        gguf_question = {**question, "model": exported["path"], "stream": False}
        show("generate, from the quantized GGUF through llama.cpp", {"method": "generate", "params": gguf_question})
        answer = sidecar.request("generate", gguf_question)
        print(f"<- {json.dumps(answer['text'])} (runtime {answer['runtime']})")
        print("   Modelfile beside it (ollama create NAME -f Modelfile):")
        modelfile = next(f for f in exported["files"] if f["role"] == "modelfile")
        for line in Path(modelfile["path"]).read_text(encoding="utf-8").splitlines():
            print(f"   | {line}")

        coreml = call("export", {"model": args.model, "format": "coreml", "context_length": 128, "prefill_length": 32,
                                 "quantization": {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel",
                                                  "group_size": 16}})
        functions = ", ".join(sorted((coreml.get("spec") or {}).get("functions", {}))) or "?"
        report = coreml.get("quantization_report") or {}
        print(f"<- Core ML package ({functions}) {mib(artifact_bytes(coreml))}: {coreml['path']}"
              + (f"; perplexity {report['perplexity_base']:.2f} -> {report['perplexity']:.2f} at 4 bits"
                 if report.get("perplexity") and report.get("perplexity_base") else ""))
        onnx = call("export", {"model": args.model, "format": "onnx"})
        check = (onnx.get("validation") or {}).get("float32") or {}
        worst = max((check.get(k) for k in ("logits_max_abs_diff_no_past", "logits_max_abs_diff_with_past")
                     if isinstance(check.get(k), (int, float))), default=None)
        print(f"<- ONNX graph {mib(artifact_bytes(onnx))}: {onnx['path']}"
              + (f"; onnxruntime vs torch, max |logit difference| {worst:.1e} (with and without past)" if worst is not None else ""))

        bench = call("benchmark", {"models": [{"model": args.model, "label": "base"},
                                              {"model": args.model, "adapters": [{"adapter": trained["artifact"]["id"]}],
                                               "label": "fine-tune"},
                                              {"model": exported["path"], "label": "Q4_K_M GGUF"}],
                                   "prompt_tokens": [32], "gen_tokens": [16], "repetitions": 2, "warmup": 1})
        for line in bench["markdown"].splitlines():
            print(f"   {line}")
        if bench["files"]["chart_png"]:
            print(f"   chart: {bench['files']['chart_png']}")

        models = call("models/list")["models"]
        for model in models:
            print(f"<- loaded: {model['model']} runtime={model['runtime']} in_use={model['in_use']} keep_alive_s={model['keep_alive_s']}")

        artifacts = call("artifacts/list", {"limit": 5})["artifacts"]
        for artifact in artifacts:
            print(f"<- artifact {artifact['id']} ({artifact['kind']}, {artifact['name']}) {mib(artifact['size_bytes'])}")

        job = call("debug/sleep", {"seconds": 1.0, "steps": 10})
        print(f"<- a long job ran in worker process {job['pid']} ({job['steps']} steps, {job['slept_s']}s)")

        show("debug/sleep, cancelled after its first progress event")
        request_id = sidecar.start("debug/sleep", {"seconds": 30, "steps": 300})
        for message in sidecar.messages():
            if message.get("method") == "$/progress":
                view.event(message)
                sidecar.notify("$/cancel", {"id": request_id})
                break
        response = sidecar.wait_response(request_id, view.event)
        view.end()
        print(f"<- error {response['error']['code']} {response['error']['message']}: partial {response['error']['data']['partial']}")

        status = call("status")
        print(f"<- {len(status['jobs'])} jobs, {len(status['models'])} models, pool {mib(status['pool']['used_bytes'])} "
              f"of {mib(status['pool']['budget_bytes'])}")

        unloaded = call("models/unload", {"model": args.model})["unloaded"]
        print(f"<- unloaded {len(unloaded)} model(s)")
        call("shutdown")
    code = sidecar.proc.returncode
    print(f"\nthe sidecar exited with code {code}")
    return 0 if code == 0 else 1
