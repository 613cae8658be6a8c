"""Human-readable report of a run (`report.md`): verdict and gates first, then accuracy, latency, size,
memory, stage timings and the environment. Built only from metrics, verdict and manifest."""

from __future__ import annotations

from typing import Any

from optimize import cpu
from optimize.reporting.ci import fmt_number, gate_table


def markdown(metrics: dict[str, Any], verdict: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The run's report as Markdown."""
    out: list[str] = []
    out += _verdict_section(verdict, manifest)
    out += _precision_section(manifest)
    out += _accuracy_section(metrics)
    fallback = metrics.get("fallback") or {}
    if fallback:
        out += _fallback_section(fallback)
    out += _latency_section(metrics)
    out += _serving_section(metrics)
    out += _size_memory_section(metrics)
    out += _engine_section(metrics)
    out += _stages_section(manifest)
    out += _environment_section(metrics, manifest)
    out.append("")
    return "\n".join(out)


def _verdict_section(verdict: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The title with the verdict, the variants' statuses, the gate table and the targets that did not run."""
    status = verdict["status"].upper()
    out = [f"# {manifest['recipe']} — {status}", ""]
    out.append(
        f"Run `{manifest['run_id']}` · baseline `fp32` · variants: "
        + ", ".join(f"`{v}` {s['status']}" for v, s in verdict["variants"].items())
    )
    out += ["", "## Gates", ""]
    out.extend(gate_table(verdict))
    skipped = {t: s for t, s in verdict["targets"].items() if s["status"] != "ran"}
    if skipped:
        out.append("")
        for target, s in skipped.items():
            out.append(f"- target `{target}` skipped: {s.get('reason', '')}")
    return out


def _accuracy_section(metrics: dict[str, Any]) -> list[str]:
    """Each variant's accuracy against FP32 per target and output, and its task metric where there is one."""
    out = ["", "## Accuracy vs FP32", ""]
    out.append(
        "| variant | target | output | cosine mean | cosine min | max abs err | mean abs err | relative err "
        "| top-1 agree | neighbour agree |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for variant, by_target in metrics["results"].items():
        if variant == "fp32":
            continue
        for target, result in by_target.items():
            if "skipped" in result:
                out.append(f"| {variant} | {target} | – | not run here: {result['skipped']} | | | | | | |")
                continue
            for output, s in result["accuracy"]["outputs"].items():
                # one number per sample has no cosine ("–"): only its errors say how far it moved
                out.append(
                    f"| {variant} | {target} | {output} | {fmt_number(s.get('cosine_mean'))} | "
                    f"{fmt_number(s.get('cosine_min'))} | {s['max_abs_error']:.3g} | {s['mean_abs_error']:.3g} | "
                    f"{fmt_number(s.get('relative_error'), 3)} | {fmt_number(s.get('top1_agreement'))} | "
                    f"{fmt_number(s.get('neighbour_agreement'))} |"
                )
            acc = result["accuracy"]
            if "task_metric" in acc:
                out.append(
                    f"| {variant} | {target} | task metric | {acc['task_metric']:.4f} "
                    f"(FP32 {acc['task_metric_baseline']:.4f}, drop {acc['task_metric_drop']:+.4f}) | | | | | | |"
                )
    return out


def _latency_section(metrics: dict[str, Any]) -> list[str]:
    """Latency and throughput per variant, target and shape; GPU compute time and transfers where measured; the
    benchmark's warnings."""
    out = ["", "## Latency and throughput", ""]
    out.append("| variant | target | shape | p50 ms | p90 ms | p99 ms | mean ms | CV | items/s | p50 speed-up |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    warnings = []
    gpu_rows = []
    for variant, by_target in metrics["results"].items():
        for target, result in by_target.items():
            for shape, s in result.get("shapes", {}).items():
                speed = f"{s['p50_speedup']:.2f}×" if "p50_speedup" in s else "1 (baseline)"
                out.append(
                    f"| {variant} | {target} | {shape} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | "
                    f"{s['p99_ms']:.3f} | {s['mean_ms']:.3f} | {s['cv']:.1%} | {s['items_per_s']:.1f} | {speed} |"
                )
                if s.get("cv_warning"):
                    warnings.append(f"- {variant} on {target} at {shape}: CV {s['cv']:.1%} (noisy machine?)")
                warnings.extend(f"- {variant} on {target} at {shape}: {w}" for w in s.get("warnings", []))
                if "gpu_compute" in s:
                    g = s["gpu_compute"]
                    gpu_rows.append(
                        f"| {variant} | {target} | {shape} | {g['p50_ms']:.3f} | {g['p90_ms']:.3f} | "
                        f"{g['p95_ms']:.3f} | {g['p99_ms']:.3f} | {fmt_number(s.get('h2d_ms'), 3)} | "
                        f"{fmt_number(s.get('d2h_ms'), 3)} | {fmt_number(s.get('enqueue_ms'), 3)} |"
                    )
    out.append("")
    out.append(
        "Latency is host to host: on GPU targets it includes the host↔device copies (trtexec's Latency); "
        "GPU compute time below excludes them."
    )
    if gpu_rows:
        out.append("")
        out.append("GPU compute time (CUDA events around the model alone) and the transfers, means in ms:")
        out.append("")
        out.append("| variant | target | shape | compute p50 | p90 | p95 | p99 | H2D | D2H | enqueue |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        out.extend(gpu_rows)
    if warnings:
        out.append("")
        out.extend(warnings)
    return out


def _serving_section(metrics: dict[str, Any]) -> list[str]:
    """The load tests (`serving.loadtest: true`): per served variant and target the highest load within the SLO
    and the judged step's numbers, then every step. Nothing when no variant was load-tested."""
    served = [
        (variant, target, r["serving"])
        for variant, by_target in metrics["results"].items()
        for target, r in by_target.items()
        if isinstance(r, dict) and r.get("serving")
    ]
    if not served:
        return []
    slo = next((s["slo"] for _, _, s in served if s.get("slo")), None) or {}
    out = ["", "## Serving under load", ""]
    if slo:
        out.append(
            f"Served on 127.0.0.1 and load-tested open-loop (latency from the intended send time); SLO: p99 ≤ "
            f"{fmt_number(slo.get('p99_ms'))} ms, errors ≤ {fmt_number(slo.get('error_rate'))}. Judged at the "
            "target load, else at `max_rps_at_slo`."
        )
        out.append("")
    out.append("| variant | target | max rps at SLO | judged rps | p99 ms | error rate | CPU | peak RSS MB |")
    out.append("|---|---|---|---|---|---|---|---|")
    for variant, target, s in served:
        out.append(
            f"| {variant} | {target} | {fmt_number(s.get('max_rps_at_slo'), 4)} | {fmt_number(s.get('rps'), 4)} | "
            f"{fmt_number(s.get('p99_ms'), 4)} | {fmt_number(s.get('error_rate'), 3)} | "
            f"{fmt_number(s.get('cpu_utilisation'), 3)} | {fmt_number(s.get('rss_peak_mb'), 4)} |"
        )
    out += ["", "| variant | target | rps | achieved rps | p50 ms | p99 ms | error rate | within SLO |"]
    out.append("|---|---|---|---|---|---|---|---|")
    for variant, target, s in served:
        for step in s.get("steps", []):
            ok = {True: "yes", False: "no"}.get(step.get("within_slo"), "–")
            out.append(
                f"| {variant} | {target} | {fmt_number(step.get('rps'), 4)} | "
                f"{fmt_number(step.get('achieved_rps'), 4)} | {fmt_number(step.get('p50_ms'), 4)} | "
                f"{fmt_number(step.get('p99_ms'), 4)} | {fmt_number(step.get('error_rate'), 3)} | {ok} |"
            )
    return out


def _size_memory_section(metrics: dict[str, Any]) -> list[str]:
    """Each variant's file size and ratio to FP32, and the memory figures recorded on each target."""
    out = ["", "## Size and memory", ""]
    out.append(
        "| variant | target | size MB | size ratio | peak RSS MB | session RSS MB | GPU peak MB | GPU session MB "
        "| engine device MB |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for variant in metrics["variants"]:
        for target, result in metrics["results"].get(variant, {}).items():
            if "skipped" in result:
                continue
            mem = result.get("memory", {})
            gpu_session = mem.get("gpu_session_mb", mem.get("torch_peak_allocated_mb"))
            out.append(
                f"| {variant} | {target} | {result['size']['bytes'] / 1e6:.2f} | {result['size']['ratio']:.3f} | "
                f"{fmt_number(mem.get('rss_peak_mb'))} | {fmt_number(mem.get('rss_session_mb'))} | "
                f"{fmt_number(mem.get('gpu_peak_mb'))} | "
                f"{fmt_number(gpu_session)} | {fmt_number(mem.get('engine_device_memory_mb'))} |"
            )
            if mem.get("note") or mem.get("gpu_memory_note"):
                out.append(f"| | | {mem.get('note') or mem.get('gpu_memory_note')} | | | | | | |")
    return out


def _stages_section(manifest: dict[str, Any]) -> list[str]:
    """Each stage's time and what it did."""
    out = ["", "## Stages", ""]
    out.append("| stage | seconds | detail |")
    out.append("|---|---|---|")
    for st in manifest.get("stages", []):
        out.append(f"| {st['stage']} | {st.get('seconds', 0):.2f} | {st.get('detail') or st.get('what', '')} |")
    return out


def _environment_section(metrics: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Host, instruction sets, GPU, library versions, and the hashes of the recipe, model, datasets and artifacts."""
    out = ["", "## Environment and lineage", ""]
    hw = manifest["hardware"]
    out.append(f"- host: {hw.get('cpu')} × {hw.get('cores')} cores, {hw.get('memory_gb')} GB; {manifest['os']}")
    out.append(f"- CPU instruction sets: {cpu.describe(hw.get('cpu_isa'))}")
    out.append(f"- GPU: {hw.get('gpu') or 'none'}")
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    out.append(f"- recipe sha256: `{manifest['recipe_sha256']}`; model content sha256: `{manifest['model']['sha256']}`")
    for name, ds in manifest.get("datasets", {}).items():
        out.append(f"- dataset `{name}`: {ds['description']}, sha256 `{ds['sha256'][:16]}…`")
    for name, art in metrics["variants"].items():
        out.append(f"- `{name}`: {art['path']} sha256 `{art['sha256']}`")
    return out


def _engine_section(metrics: dict[str, Any]) -> list[str]:
    """Each TensorRT engine: where it is, how long it took, and the precisions its layers run in."""
    engines = {n: v["engine"] for n, v in metrics["variants"].items() if v.get("engine")}
    if not engines:
        return []
    out = ["", "## TensorRT engines", ""]
    out.append(
        "| variant | layer precisions (compute layers) | all layers | precision check | build s | plan MB "
        "| plan vs FP32 | plan |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for name, e in engines.items():
        hist = e["precisions"]
        compute = ", ".join(f"{p} {n}" for p, n in hist.get("compute", {}).items()) or "–"
        every = ", ".join(f"{p} {n}" for p, n in hist.get("all", {}).items()) or "–"
        check = e["precision_check"]
        out.append(
            f"| {name} | {compute} | {every} | {check['status']}: {check['reason']} | {e['build_s']:.1f} | "
            f"{fmt_number(e.get('plan_bytes', 0) / 1e6, 4)} | {fmt_number(e.get('plan_ratio'), 3)} | `{e['path']}` |"
        )
    return out


def _fallback_section(fallback: dict[str, Any]) -> list[str]:
    """Every INT8 fallback trial: what was kept in high precision, accuracy on the tuning data, speed."""
    out = ["", "## INT8 accuracy-aware fallback", ""]
    for variant, fb in fallback.items():
        chosen = fb["trials"][fb["chosen_trial"]]
        out.append(
            f"`{variant}` tuned on `{fb.get('dataset')}`: kept trial {fb['chosen_trial']} "
            f"({'passed' if fb['passed'] else 'no trial passed'}; {chosen['excluded_count']} node(s) in high "
            f"precision); search stopped: {fb['stopped']}."
            + (
                f" Not tuned on (the tuning data have no labels): {', '.join(f'`{c}`' for c in fb['not_tuned_on'])}."
                if fb.get("not_tuned_on")
                else ""
            )
        )
        out.append("")
        out.append("| trial | nodes kept high-precision | cosine mean | cosine min | p50 speed-up | seconds | result |")
        out.append("|---|---|---|---|---|---|---|")
        for t in fb["trials"]:
            acc = t["accuracy"]
            shown = ", ".join(f"`{n}`" for n in t["excluded"][:6]) + (" …" if len(t["excluded"]) > 6 else "")
            result = "passed" if t["passed"] else "failed: " + "; ".join(t["failed_gates"])
            out.append(
                f"| {t['trial']}{' ✓' if t['trial'] == fb['chosen_trial'] else ''} | {t['excluded_count']} "
                f"{shown} | {fmt_number(acc.get('cosine_mean'))} | {fmt_number(acc.get('cosine_min'))} | "
                f"{fmt_number(t.get('p50_speedup'), 3)} | {t['seconds']:.1f} | {result} |"
            )
        out.append("")
    return out


def _precision_section(manifest: dict[str, Any]) -> list[str]:
    """How each variant was built: backend, calibration (data, chunks, peak RSS against the budget), fusion,
    nodes kept in high precision."""
    stage = next((st for st in manifest.get("stages", []) if st.get("stage") == "precision"), {})
    records = stage.get("variants") or {}
    if not records:
        return []
    out = ["", "## How the variants were built", ""]
    out.append("| variant | backend | calibration | fusion | nodes kept high-precision |")
    out.append("|---|---|---|---|---|")
    for name, r in records.items():
        cal = r.get("calibration") or {}
        calib = "–"
        if cal:
            calib = f"{cal.get('method')} on {cal.get('samples')} samples"
            if cal.get("chunk_batches"):
                calib += f", {cal['chunk_batches']} batch(es) a chunk"
            if cal.get("per_node"):
                calib += ", node by node"
            if cal.get("peak_rss_mb") is not None:
                calib += f", peak RSS {cal['peak_rss_mb']:.0f} MB (budget {cal.get('memory_budget_gb')} GB)"
        elif r.get("backend") == "onnxruntime-dynamic":
            calib = "none (dynamic)"
        fusion = ", ".join(f"{op} {n}" for op, n in (r.get("fusion") or {}).items()) or "–"
        kept = r.get("nodes_excluded")
        out.append(f"| {name} | {r.get('backend')} | {calib} | {fusion} | {len(kept) if kept is not None else '–'} |")
    return out
