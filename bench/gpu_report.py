"""The GPU session's results (``bench/gpu_parts.py``): the targets met or missed, and the markdown section that
``bench/bench_gpu.py --session-report`` writes into docs/benchmarks.md between its markers."""

from __future__ import annotations

from collections.abc import Callable

from gpu_parts import MODULE_MODES, PARTS

START, END = "<!-- gpu_session:start -->", "<!-- gpu_session:end -->"


def _ms(result) -> float | None:
    return result.get("ms") if isinstance(result, dict) else None


def best_module(part: dict | None) -> tuple[float, str] | None:
    """The fastest mode of a module part's row: (ms, mode)."""
    if not part or not part.get("rows"):
        return None
    row = part["rows"][0]
    timed = [(_ms(row.get(mode)), mode) for mode in MODULE_MODES if _ms(row.get(mode)) is not None]
    return min(timed) if timed else None


def sampler_results(part: dict | None) -> dict[str, dict]:
    """A sampler part's modes and their results (the row's entries that are measured modes)."""
    if not part or not part.get("rows"):
        return {}
    return {k: v for k, v in part["rows"][0].items() if isinstance(v, dict) and any(x.startswith("batch") for x in v)}


def best_sampler(part: dict | None, batch: int) -> tuple[float, str] | None:
    timed = [(r[f"batch{batch}_ms"], mode) for mode, r in sampler_results(part).items() if f"batch{batch}_ms" in r]
    return min(timed) if timed else None


def best_image(part: dict | None) -> tuple[float, str] | None:
    """Text (eager or graph, the faster) plus the fastest sampler mode at batch 1."""
    sampled = best_sampler(part, 1)
    if sampled is None:
        return None
    row = part["rows"][0]
    text = [(_ms(row.get(k)), k) for k in ("text eager", "text graph") if _ms(row.get(k)) is not None]
    if not text:
        return None
    text_ms, text_mode = min(text)
    return text_ms + sampled[0], f"{text_mode} {text_ms:.2f} ms + {sampled[1]} {sampled[0]:.2f} ms"


def _ratio(parts: dict) -> tuple[float, str] | None:
    ours, sdxl = best_module(parts.get("unet-snapgen")), best_module(parts.get("unet-sdxl"))
    if ours is None or sdxl is None:
        return None
    return sdxl[0] / ours[0], f"SDXL {sdxl[0]:.2f} ms ({sdxl[1]}) / SnapGen {ours[0]:.2f} ms ({ours[1]})"


def _per_second(parts: dict) -> tuple[float, str] | None:
    fastest = best_sampler(parts.get("default-model"), 64)
    return None if fastest is None else (64_000 / fastest[0], fastest[1])


# (what, unit, limit, at most (True) or at least, how the value is found)
TARGETS: list[tuple[str, str, float, bool, Callable[[dict], tuple[float, str] | None]]] = [
    ("snapgen-379m 1024 px U-Net step, fp16, batch 1", "ms", 5.0, True,
     lambda p: best_module(p.get("unet-snapgen"))),
    ("... against SDXL's U-Net, best mode of each", "x faster", 3.0, False, _ratio),
    ("4-step 1024 px image: text + 4 steps + tiny decoder, fp16, batch 1", "ms", 30.0, True,
     lambda p: best_image(p.get("image-1024"))),
    ("default model, 4-step 128 px image, batch 1 (text embeddings given)", "ms", 5.0, True,
     lambda p: best_sampler(p.get("default-model"), 1)),
    ("default model, images/s at batch 64", "images/s", 2000.0, False, _per_second),
    ("tiny decoder at 1024 px, fp16, batch 1", "ms", 1.6, True, lambda p: best_module(p.get("decoder"))),
]  # fmt: skip


def targets(parts: dict[str, dict]) -> list[dict]:
    """Each target with its value and whether it is met (None: not measured, or a smoke run's numbers)."""
    smoke = any(p.get("smoke") for p in parts.values())
    rows = []
    for what, unit, limit, at_most, find in TARGETS:
        found = find(parts)
        met = None if found is None or smoke else (found[0] <= limit if at_most else found[0] >= limit)
        value, how = found if found is not None else (None, None)
        rows.append(dict(target=what, unit=unit, limit=limit, at_most=at_most, met=met, value=value, how=how))
    return rows


def targets_text(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        verdict = {True: "MET   ", False: "MISSED", None: "NO VERDICT (not measured, or a smoke run)"}[r["met"]]
        bound = f"{'<=' if r['at_most'] else '>='} {r['limit']:g} {r['unit']}"
        value = "" if r["value"] is None else f"{r['value']:.2f} {r['unit']} ({r['how']})"
        lines.append(f"{verdict}  {r['target']}: {bound}; {value}")
    return "\n".join(lines)


def _cell(result) -> str:
    if not isinstance(result, dict):
        return ""
    if "ms" in result:
        extra = f" (compile {result['compile_s']:.0f} s)" if "compile_s" in result else ""
        return f"{result['ms']:.2f}{extra}"
    if "error" in result:
        return "error"
    if "running" in result:
        return "cut off"
    return "skipped"


def _problems(part: dict) -> list[str]:
    """Errors and skips of a part, one line each, for the notes under its table."""
    found = [f"{part['part']}: {part['error']}"] if part.get("error") else []
    for row in part.get("rows", []):
        for mode, result in row.items():
            if not isinstance(result, dict):
                continue
            if "error" in result:
                found.append(f"{part['part']} {mode}: {result['error']}")
            elif "skipped" in result:
                found.append(f"{part['part']} {mode}: skipped: {result['skipped']}")
            elif "running" in result:
                found.append(f"{part['part']} {mode}: cut off by the part's time budget")
    return found


def markdown(parts: dict[str, dict]) -> str:
    first = next(iter(parts.values()))
    card = first.get("gpu") or first.get("device")
    smoke = any(p.get("smoke") for p in parts.values())
    lines = [
        START,
        f"## GPU session: {card} (`bench/gpu_session.sh`, {first['date']}, torch {first['torch']}, "
        f"triton {first.get('triton')}, CUDA {first.get('cuda')})",
        "",
    ]
    if smoke:
        lines += ["**Smoke run: tiny shapes, one run each; these numbers measure nothing.**", ""]
    lines += ["| target | limit | measured | met |", "|---|---|---|---|"]
    for r in targets(parts):
        bound = f"{'≤' if r['at_most'] else '≥'} {r['limit']:g} {r['unit']}"
        value = "not measured" if r["value"] is None else f"{r['value']:.2f} {r['unit']} ({r['how']})"
        lines.append(f"| {r['target']} | {bound} | {value} | {({True: 'yes', False: '**no**', None: ''})[r['met']]} |")
    modules = [parts[name] for name in ("unet-snapgen", "unet-sdxl", "decoder") if name in parts]
    if modules:
        lines += ["", "One call at batch 1, fp16, ms (random weights; U-Nets with 77 text tokens):", ""]
        lines += ["| model | px | " + " | ".join(MODULE_MODES) + " |", "|---" * (len(MODULE_MODES) + 2) + "|"]
        for part in modules:
            for row in part.get("rows", []):
                cells = " | ".join(_cell(row.get(mode)) for mode in MODULE_MODES)
                lines.append(f"| {row['name']} | {part.get('resolution')} | {cells} |")
    for name, title in (("default-model", "The embedded default model, text embeddings to pixels"),
                        ("image-1024", "A 4-step 1024 px image, snapgen-379m, random weights")):  # fmt: skip
        results = sampler_results(parts.get(name))
        if not results:
            continue
        batches = parts[name]["rows"][0].get("batches", [1])
        lines += ["", f"{title} (ms; a graph's images against eager's 8-bit values):", ""]
        lines += ["| mode | " + " | ".join(f"batch {b}" for b in batches) + " | images/s | graph = eager |"]
        lines += ["|---" * (len(batches) + 3) + "|"]
        for mode, r in results.items():
            cells = " | ".join(f"{r[f'batch{b}_ms']:.2f}" if f"batch{b}_ms" in r else "" for b in batches)
            last = f"batch{batches[-1]}_ms"
            rate = f"{1000 * batches[-1] / r[last]:.0f}" if last in r else ""
            same = "" if "bytes_equal_eager" not in r else ("yes" if r["bytes_equal_eager"] else
                                                             f"no (max {r['max_diff_vs_eager']})")  # fmt: skip
            lines.append(f"| {mode} | {cells} | {rate} | {same} |")
        row = parts[name]["rows"][0]
        if "text eager" in row:
            lines += ["", f"Text ({row.get('text_tokens')} tokens: CLIP-L, CLIP-G, Gemma-2-2b): eager "
                      f"{_cell(row['text eager'])} ms, graph {_cell(row.get('text graph'))} ms."]  # fmt: skip
    server = parts.get("server")
    if server and server.get("rows"):
        row = server["rows"][0]
        batches = row.get("batches", [])
        lines += ["", "The worker's engine (`TorchBackend.generate`: text encoder, 4 steps, decoder, uint8), default "
                  "model, ms:", ""]  # fmt: skip
        lines += ["| mode | " + " | ".join(f"batch {b}" for b in batches) + " | images/s | warm-up s | same bytes |"]
        lines += ["|---" * (len(batches) + 4) + "|"]
        for mode, r in row.items():
            if not isinstance(r, dict) or mode in ("batches",):
                continue
            cells = " | ".join(f"{r[f'batch{b}_ms']:.1f}" if f"batch{b}_ms" in r else _cell(r) for b in batches)
            last = f"batch{batches[-1]}_ms"
            rate = f"{1000 * batches[-1] / r[last]:.0f}" if last in r else ""
            warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else ""
            same = {True: "yes", False: "**no**", None: ""}[r.get("identical_to_twin")]
            lines.append(f"| {mode} | {cells} | {rate} | {warm} | {same} |")
        if server.get("text_encoder_weights") == "random":
            lines += ["", "(MiniLM's weights were random on this run, same shapes: timings hold, images do not.)"]
    problems = [p for name in PARTS if name in parts for p in _problems(parts[name])]
    if problems:
        lines += ["", "Errors and skips:", ""] + [f"- {p}" for p in problems]
    lines.append(END)
    return "\n".join(lines) + "\n"
