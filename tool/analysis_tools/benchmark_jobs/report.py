"""The main numbers of a result as a Markdown table (for docs/performance.md): one column per precision."""
from __future__ import annotations

from typing import Dict, List, Optional


def _pct(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.0f} %"


def _header(result: Dict, columns: List[str]) -> List[str]:
    machine, model = result["machine"], result["model"]
    load = machine.get("load_average")
    return [f"Machine: {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}, device "
            f"{machine['device']}" + (f", load average {load[0]:.1f} at the start" if load else "") +
            f"; model {model['arch']}/{model['backbone']}{model['layers']}, weights {model['weights']}.", "",
            "| measurement | " + " | ".join(columns) + " |", "| --- | " + " | ".join("---" for _ in columns) + " |"]


def _row(label: str, values: List[str]) -> str:
    return f"| {label} | " + " | ".join(values) + " |"


def benchmark_table(result: Dict) -> str:
    """tool/analysis_tools/benchmark.py's result (utilisation in % of the same-dtype peak rate, the
    fastest of the matmul and convolution probes, measured in the same run just before the job)."""
    peak = result["peak"]
    columns = list(peak)

    def first(text: str) -> List[str]:  # a value in the first column only
        return [text] + [""] * (len(columns) - 1)

    def per(section: Dict, fmt) -> List[str]:
        return [fmt(section[p]) if p in section else "" for p in columns]

    lines = _header(result, columns)
    lines.append(_row("peak GFLOP/s at the start (the limit: the fastest of the matmul and convolution probes)",
                      [f"{peak[p]['gflops']:.0f}" for p in columns]))
    lines.append(_row("kernel that set the limit", [peak[p]["kernel"] for p in columns]))
    ev = result.get("eval")
    if ev:
        where = (f"{ev['image_size'][0]}x{ev['image_size'][1]} image, scales {ev['scales']}, {ev['crops_per_image']} "
                 f"crops of {ev['crop'][0]} ({ev['gflop_per_image']:.0f} GFLOP)"
                 + (", torch.compile with freezing" if ev.get("compile") else ""))
        lines.append(_row(f"sliding-window test, s/image ({where})",
                          per(ev, lambda r: f"{r['seconds_per_image']:.2f}")))
        lines.append(_row("sliding-window test, utilisation (of the peak rate just before it)",
                          per(ev, lambda r: _pct(r["utilisation"]))))
        lines.append(_row("peak GFLOP/s just before the sliding-window test",
                          per(ev, lambda r: f"{r['peak_gflops_before']:.0f}")))
        ort = ev.get("onnxruntime_fp32") or {}
        if "seconds_per_image" in ort:
            lines.append(_row(f"same test through onnxruntime ({ort['threads']} threads), s/image",
                              first(f"{ort['seconds_per_image']:.2f}")))
            lines.append(_row("same test through onnxruntime, utilisation (of the peak rate just before it)",
                              first(_pct(ort["utilisation"]))))
            if "pytorch_fp32_over_onnxruntime" in ort:
                lines.append(_row("PyTorch fp32 time / onnxruntime time (below 1: PyTorch faster)",
                                  first(f"{ort['pytorch_fp32_over_onnxruntime']:.2f}")))
            if "equal_pytorch_fp32_fraction" in ort:
                lines.append(_row("onnxruntime pixels equal to PyTorch fp32",
                                  first(f"{100 * ort['equal_pytorch_fp32_fraction']:.3f} %")))
        naive = ev.get("naive_fp32") or {}
        if "seconds_per_image" in naive:
            lines.append(_row("release-style loop (1 window/forward, NCHW), s/image",
                              first(f"{naive['seconds_per_image']:.2f}")))
            lines.append(_row("speed-up over the release-style loop",
                              [f"{naive['speedup_' + p]:.1f}x" if naive.get("speedup_" + p) else "" for p in columns]))
            if "fp32_equal_naive_fraction" in naive:
                lines.append(_row("fp32 pixels equal to the release-style loop",
                                  first(f"{100 * naive['fp32_equal_naive_fraction']:.3f} %")))
    tr = result.get("train")
    if tr:
        lines.append(_row(f"training, images/s (batch {tr['batch']}, {tr['crop'][0]}x{tr['crop'][1]}, "
                          f"{tr['gflop_per_step']:.0f} GFLOP/step)", per(tr, lambda r: f"{r['images_per_s']:.2f}")))
        lines.append(_row("training, utilisation (of the peak rate just before it)",
                          per(tr, lambda r: _pct(r["utilisation"]))))
        lines.append(_row("peak GFLOP/s just before the training steps",
                          per(tr, lambda r: f"{r['peak_gflops_before']:.0f}")))
    data = result.get("data") or {}
    if "samples_per_s" in data:
        where = f"{data['workers']} workers, batch {data['batch']}, {data['crop'][0]}x{data['crop'][1]}"
        lines.append(_row(f"data loading alone, samples/s ({where})", first(f"{data['samples_per_s']:.1f}")))
        lines.append(_row(f"training step ({data['precision']}) fed from memory / by the loader, images/s",
                          first(f"{data['train_images_per_s_from_memory']:.2f} / "
                                f"{data['train_images_per_s_from_loader']:.2f}")))
    memory = result.get("memory_check") or {}
    if "peak_rss_gib" in memory:
        lines.append(_row(f"peak memory, six-scale test of {memory['image_size'][1]}x{memory['image_size'][0]} "
                          f"({memory['classes']} classes, {memory['precision']}), GiB",
                          first(f"{memory['peak_rss_gib']:.2f}")))
    lines.append(_row("peak memory of the benchmark process, GiB", first(f"{result['peak_memory']['rss_gib']:.2f}")))
    return "\n".join(lines)


def accuracy_table(result: Dict) -> str:
    """tool/analysis_tools/check_bf16.py's result."""
    lines = _header(result, ["bf16 against fp32"])
    agreement = result.get("agreement") or {}
    if "bf16_equal_fp32_fraction" in agreement:
        lines.append(_row(f"bf16 pixels equal to fp32 ({agreement['images']} real images)",
                          [f"{100 * agreement['bf16_equal_fp32_fraction']:.2f} %"]))
    curve = result.get("loss_curve") or {}
    if "bf16_vs_fp32_mean_abs_diff" in curve:
        lines.append(_row(f"training loss, {curve['steps']} real steps: mean abs. difference to fp32 (noise: fp32 "
                          f"with other dropout masks {curve['noise_mean_abs_diff']:.3f})",
                          [f"{curve['bf16_vs_fp32_mean_abs_diff']:.3f}"]))
    return "\n".join(lines)
