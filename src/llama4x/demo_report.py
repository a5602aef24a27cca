"""The demo's report: `report.json` (every number), `report.md`, PNG plots, and the stage summary table.

Plots (matplotlib's Agg canvas, no pyplot state):

- `plots/loss_curves.png`: the teacher's text and digit losses, its routing max-violation in training, the LoRA
  loss and the students' losses, per step;
- `plots/expert_load.png`: the teacher's held-out share of tokens per expert and MoE layer;
- `plots/accuracy.png`: digit and even/odd accuracy per model, held-out text perplexity per model;
- `plots/digits_answers.png`: held-out scans with the teacher's digit answer and the LoRA model's even/odd answer.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

PLOTS = ("loss_curves.png", "expert_load.png", "accuracy.png", "digits_answers.png")


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _curve(ax, history: list[dict[str, Any]], key: str, label: str, step_key: str = "step", **style) -> None:
    points = [(entry[step_key], entry[key]) for entry in history if key in entry and step_key in entry]
    if points:
        ax.plot(*zip(*points), label=label, **style)


def plot_loss_curves(results: dict[str, Any], path: Path) -> Path:
    """2x3 panels: teacher losses and routing, LoRA loss and routing, the two students' losses."""
    fig = _figure((15, 8))
    teacher = results.get("teacher", {}).get("history", [])
    ax = fig.add_subplot(2, 3, 1)
    _curve(ax, teacher, "text_loss", "text (next token)")
    _curve(ax, teacher, "digits_loss", "digits (answer tokens)")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss (nats/token, log scale)", title="Teacher pretraining")

    ax = fig.add_subplot(2, 3, 2)
    _curve(ax, teacher, "max_violation", "training tokens of each logging window")
    evaluation = results.get("evaluate", {}).get("routing")
    if evaluation:
        ax.axhline(evaluation["max_violation"], color="tab:green", ls="--", label="held-out, trained bias")
        ax.axhline(evaluation["max_violation_without_bias"], color="tab:red", ls=":", label="held-out, bias removed")
    ax.set(xlabel="step", ylabel="max load / mean load - 1", title="Teacher routing max-violation (mean of layers)")

    lora = results.get("lora", {}).get("history", [])
    ax = fig.add_subplot(2, 3, 4)
    _curve(ax, lora, "parity_loss", "LoRA on even / odd")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss (nats/token, log scale)", title="LoRA fine-tuning (even / odd)")

    ax = fig.add_subplot(2, 3, 5)
    _curve(ax, lora, "max_violation", "training tokens of each logging window", color="tab:purple")
    ax.set(
        xlabel="step", ylabel="max load / mean load - 1", title="Routing during LoRA (biases fixed, router trained)"
    )

    students = results.get("distill", {}).get("students", {})
    for position, kind, data in ((3, "llama4x", "digits"), (6, "llama", "text")):
        ax = fig.add_subplot(2, 3, position)
        logs = students.get(kind, {}).get("logs", {})
        seeds = students.get(kind, {}).get("seeds", [])
        if len(seeds) > 1:
            data += f" (seed {seeds[0]} of {len(seeds)})"
        _curve(ax, logs.get("distilled", []), "ce_loss", "distilled (KD + label loss)")
        _curve(ax, logs.get("labels_only", []), "ce_loss", "labels only", ls="--")
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="label cross-entropy (nats/token, log scale)",
               title=f"{kind} student on {data}")  # fmt: skip
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
        else:  # a stage that has not run
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, path)


def _student_seeds(results: dict[str, Any]) -> int:
    """How many seeds each student pair of the distill stage was trained with (1 before that stage ran)."""
    return len(results.get("distill", {}).get("students", {}).get("llama4x", {}).get("seeds", [None]))


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Accuracy per model and task (left) and held-out text perplexity per model (right)."""
    fig = _figure((12, 4.5))
    evaluation = results.get("evaluate", {})
    lora = results.get("lora", {})
    students = results.get("distill", {}).get("evaluation", {})
    bars = []
    if evaluation:
        bars.append(("teacher\ndigit", evaluation["digits_accuracy"], "tab:blue"))
    for name, color in (("distilled", "tab:orange"), ("labels_only", "tab:gray")):
        entry = students.get(f"llama4x/{name}")
        if entry:
            bars.append((f"llama4x student\n{name.replace('_', '-')}\ndigit", entry["digits_accuracy"], color))
    if lora:
        bars.append(("teacher\neven/odd\nbefore LoRA", lora["accuracy_before"], "tab:gray"))
        bars.append(("teacher + LoRA\neven/odd", lora["accuracy_after"], "tab:green"))
    ax = fig.add_subplot(1, 2, 1)
    if bars:
        drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        ax.bar_label(drawn, labels=[f"{b[1]:.1%}" for b in bars], fontsize=8)
    if lora:
        ax.axhline(lora["chance"], color="k", ls=":", lw=1, label="even/odd chance (50%)")
        ax.legend(loc="upper right", fontsize=8)
    seeds = _student_seeds(results)
    means = f"students: means of {seeds} seeds" if seeds > 1 else ""
    title = "Held-out accuracy per model" + (f" ({means})" if means else "")
    ax.set(ylim=(0, 1.25), ylabel="exact-match accuracy (held-out scans)", title=title)
    ax.tick_params(axis="x", labelsize=8)

    ax = fig.add_subplot(1, 2, 2)
    perplexities = []
    if evaluation:
        perplexities.append(("teacher (MoE)", evaluation["text_perplexity"], "tab:blue"))
    for key, label, color in (
        ("llama/distilled", "llama student\ndistilled", "tab:orange"),
        ("llama/labels_only", "llama student\nlabels-only", "tab:gray"),
        ("llama4x/distilled", "llama4x student\ndistilled (digits)", "tab:olive"),
        ("llama4x/labels_only", "llama4x student\nlabels-only (digits)", "silver"),
    ):
        if key in students:
            perplexities.append((label, students[key]["text_perplexity"], color))
    if perplexities:
        drawn = ax.bar([p[0] for p in perplexities], [p[1] for p in perplexities], color=[p[2] for p in perplexities])
        ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    title = "Held-out text perplexity (Python docs)" + (f"; {means}" if means else "")
    ax.set(ylabel="perplexity (lower is better)", title=title)
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def plot_digit_answers(records: list[dict[str, Any]], results: dict[str, Any], path: Path, count: int = 16) -> Path:
    """A grid of held-out scans titled with the teacher's digit answer and the LoRA model's even/odd answer; green
    when right, red when wrong."""
    digit_answers = results.get("evaluate", {}).get("digits_answers", [])
    parity_answers = results.get("lora", {}).get("answers_after", [])
    count = min(count, len(records), len(digit_answers))
    cols = 8
    rows = max(1, -(-count // cols))
    fig = _figure((1.6 * cols, 1.9 * rows + 0.5))
    for i in range(count):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(records[i]["image"].convert("L"), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        truth = records[i]["answer"]
        right = digit_answers[i] == truth
        title = f"says {digit_answers[i]!r}"
        if i < len(parity_answers):
            parity = "even" if int(truth) % 2 == 0 else "odd"
            title += f"\n{parity_answers[i]!r}"
            right = right and parity_answers[i] == parity
        ax.set_title(title, fontsize=8, color="tab:green" if right else "tab:red")
        ax.set_xlabel(f"label {truth}", fontsize=7)
    fig.suptitle(
        "Held-out scans: teacher's answer to 'What digit is this?' and, below, the LoRA model's to "
        "'Is this digit even or odd?' (green: both right)",
        fontsize=9,
    )
    return _save(fig, path)


def versions() -> dict[str, str]:
    """Versions of Python, the main libraries and llama4x, and the machine."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"python": platform.python_version()}
    for name in ("llama4x", "torch", "transformers", "peft", "accelerate", "tokenizers", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    found["platform"] = platform.platform()
    return found


def targets(settings, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the issue asks the report to show (for the stages that ran), each with its value and whether it is met."""
    wanted = settings.targets
    evaluation, lora = results.get("evaluate"), results.get("lora")
    students = results.get("distill", {}).get("evaluation", {})
    checks: dict[str, dict[str, Any]] = {}
    if evaluation:
        value = evaluation["digits_accuracy"]
        checks["teacher digits accuracy"] = {
            "value": value, "target": f">= {wanted['teacher_digits_accuracy']:.0%}",
            "met": value >= wanted["teacher_digits_accuracy"],
        }  # fmt: skip
        routing = evaluation["routing"]
        checks["routing max-violation below the no-bias routing"] = {
            "value": routing["max_violation"], "target": f"< {routing['max_violation_without_bias']:.2f}",
            "met": routing["max_violation"] < routing["max_violation_without_bias"],
        }  # fmt: skip
    if lora:
        checks["LoRA even/odd accuracy"] = {
            "value": lora["accuracy_after"], "target": f">= {wanted['lora_parity_accuracy']:.0%}",
            "met": lora["accuracy_after"] >= wanted["lora_parity_accuracy"],
        }  # fmt: skip
    if settings.quick:  # a few steps of distillation compare noise, not methods
        return checks
    seeds = _student_seeds(results)
    over = f" (means of {seeds} seeds)" if seeds > 1 else ""
    if "llama4x/distilled" in students:
        d, b = students["llama4x/distilled"]["digits_accuracy"], students["llama4x/labels_only"]["digits_accuracy"]
        checks[f"llama4x student digits accuracy: distilled vs labels-only{over}"] = {
            "value": d, "target": f"> {b:.3f}", "met": d > b,
        }  # fmt: skip
    if "llama/distilled" in students:
        d, b = students["llama/distilled"]["text_perplexity"], students["llama/labels_only"]["text_perplexity"]
        checks[f"llama student text perplexity: distilled vs labels-only{over}"] = {
            "value": d, "target": f"< {b:.2f}", "met": d < b,
        }  # fmt: skip
    return checks


def _stage_seconds(out: Path, stages: list[str]) -> dict[str, float]:
    """The times of the reported `stages` (not those of other markers in `out`: stages left out, an older report)."""
    seconds = {}
    for stage in stages:
        marker = out / "stages" / f"{stage}.json"
        if marker.is_file():
            seconds[stage] = json.loads(marker.read_text())["seconds"]
    return seconds


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    """`report.md`: the headline numbers, tables and plots of `report.json`."""
    s, v = report["settings"], report["versions"]
    lines = [
        "# llama4x demo report",
        "",
        f"{'Quick' if s['quick'] else 'Full'} run, seed {s['seed']}, fusion `{s['fusion']}`; "
        f"{v['machine']}; Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, llama4x {v['llama4x']}. Total time {report['total_seconds'] / 60:.1f} min.",
        "",
        "## Targets",
        "",
        "| check | value | target | met |",
        "|---|---:|---|---|",
    ]
    for name, check in report["targets"].items():
        lines.append(f"| {name} | {check['value']:.3f} | {check['target']} | {'yes' if check['met'] else 'NO'} |")
    lines += ["", "## Stages", "", "| stage | time (s) |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report["stage_seconds"].items()]

    tok = report.get("tokenizer")
    if tok:
        lines += [
            "", "## Tokenizer", "",
            f"Byte-level BPE, vocabulary {tok['vocab_size']} (all {len(tok['special_tokens'])} special tokens single "
            f"tokens), trained on {tok['train_documents']} documents of Python's docs ({tok['train_tokens']:,} tokens); "
            f"{tok['eval_documents']} documents ({tok['eval_tokens']:,} tokens) held out; "
            f"{tok['eval_chars_per_token']:.2f} characters per token on held-out text; exact round trip: "
            f"{tok['round_trip']}.",
        ]  # fmt: skip
    teacher = report.get("teacher")
    if teacher:
        c = teacher["config"]
        lines += [
            "", "## Teacher", "",
            f"Early-fusion `{c['fusion']}` front-end ({teacher['image_tokens_per_scan']} image tokens per scan of "
            f"{c['image_size']}x{c['image_size']} pixels"
            + (f", scans shifted by up to {c['augment_shift']} pixel in training" if c["augment_shift"] else "")
            + f"), "
            f"{c['layers']} layers of width {c['hidden_size']} ({', '.join(c['layer_types'])}; chunks of "
            f"{c['attention_chunk_size']} tokens in {c['block_size']}-token text blocks), {c['routed_experts']} routed "
            f"experts top-{c['experts_per_token']} + {c['shared_experts']} shared expert per layer, loss-free balancing "
            f"(bias rate {c['router_bias_update_rate']}). {teacher['parameters']:,} parameters, "
            f"{teacher['active_parameters']:,} active per token. {teacher['steps']} steps, each one batch of text "
            f"blocks plus one batch of digit questions ({teacher['epochs_text']:.1f} text epochs, "
            f"{teacher['epochs_digits']:.1f} digits epochs), {teacher['train_seconds']:.0f} s.",
        ]  # fmt: skip
    ev = report.get("evaluation")
    if ev:
        r = ev["routing"]
        lines += [
            "", "## Evaluation of the teacher (held-out data)", "",
            "| metric | value |", "|---|---:|",
            f"| text perplexity ({ev['text_eval_tokens']:,} tokens; uniform would be {ev['uniform_perplexity']:.0f}) | "
            f"{ev['text_perplexity']:.2f} |",
            f"| digits accuracy, greedy exact match ({ev['digits_eval_examples']} scans) | {_pct(ev['digits_accuracy'])} |",
            f"| digits answer perplexity (answer + end-of-turn tokens) | {ev['digits_answer_perplexity']:.4f} |",
            f"| routing max-violation, mean of layers ({r['tokens']:,} tokens) | {r['max_violation']:.3f} |",
            f"| routing max-violation with the balancing bias removed (same weights) | "
            f"{r['max_violation_without_bias']:.3f} |",
            "", "Max-violation is `max_i load_i / mean_load - 1` per MoE layer (0: balanced; 15: one expert takes every "
            "token), averaged over the layers; for a model trained without any balancing see the no-balancing "
            "variant of `llama4x bench balance` (BENCHMARKS.md).",
            "", "Greedy text samples:", "",
        ]  # fmt: skip
        lines += [f"- `{sample['text']!r}`" for sample in ev["text_samples"]]
        lines += ["", "![expert load](plots/expert_load.png)"]
    lora = report.get("lora")
    if lora:
        lines += [
            "", "## LoRA: a new question", "",
            f"\"{lora['question']}\" -> even / odd, learned by LoRA (r={lora['r']}) on {', '.join(p for p in lora['parts'] if p != 'router')}, "
            f"with the routers and the LM head trained in full ({lora['trainable_parameters']:,} trainable parameters, "
            f"base frozen: "
            f"{lora['base_parameters']:,}), {lora['steps']} steps, {lora['train_seconds']:.0f} s. Held-out accuracy "
            f"({lora['eval_examples']} scans): before {_pct(lora['accuracy_before'])} (chance is 50%; the base model "
            f"answers with digits, e.g. {lora['answers_before'][:4]}), after {_pct(lora['accuracy_after'])}.",
        ]  # fmt: skip
    distill = report.get("distillation")
    if distill:
        ev_s = distill["evaluation"]
        seeds = distill["students"]["llama"]["seeds"]
        lines += [
            "", "## Distillation into dense students", "",
            "Each student starts from the teacher's weights (embeddings, attention, norms, vision front-end; FFN = "
            "shared expert + routed experts merged by routing frequency) and is trained the same steps twice: "
            f"distilled (forward KL to the teacher at temperature {distill['students']['llama']['temperature']:g}, "
            f"weight {distill['students']['llama']['alpha']:g}, plus the label loss) and on the labels only. "
            f"Each pair is trained with seeds {', '.join(map(str, seeds))} (the order of its data, and for the "
            "digits students the subset of labelled scans they learn from); the student rows are the means over "
            "those seeds.", "",
            "| model | data | steps | parameters | digits accuracy | digits answer perplexity | text perplexity "
            "| decode tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        if ev:
            lines.append(
                f"| teacher (MoE) | text + digits | {teacher['steps'] if teacher else ''} | "
                f"{teacher['parameters'] if teacher else 0:,} | {_pct(ev['digits_accuracy'])} | "
                f"{ev['digits_answer_perplexity']:.4f} | {ev['text_perplexity']:.2f} | "
                f"{ev_s['teacher']['decode_tokens_per_second']:.0f} |"
            )
        for kind, student in distill["students"].items():
            data = student["data"] if kind == "llama" else f"{student['data']} ({student['train_examples']:,} scans)"
            for name in ("distilled", "labels_only"):
                e = ev_s[f"{kind}/{name}"]
                acc = _pct(e["digits_accuracy"]) if "digits_accuracy" in e else "(text only)"
                answer = f"{e['digits_answer_perplexity']:.4f}" if "digits_answer_perplexity" in e else ""
                lines.append(
                    f"| {kind} student, {name.replace('_', '-')} | {data} | {student['steps']} | "
                    f"{student['parameters']:,} | {acc} | {answer} | {e['text_perplexity']:.2f} | "
                    f"{e['decode_tokens_per_second']:.0f} |"
                )
        if len(seeds) > 1:
            lines += ["", f"Per seed ({', '.join(map(str, seeds))}):", ""]
            for key, metric, show in (
                ("llama4x", "digits_accuracy", _pct),
                ("llama", "text_perplexity", lambda v: f"{v:.2f}"),
            ):
                runs = {name: ev_s[f"{key}/{name}"]["per_seed"][metric] for name in ("distilled", "labels_only")}
                wins = sum(
                    (d > b) if metric == "digits_accuracy" else (d < b)
                    for d, b in zip(runs["distilled"], runs["labels_only"])
                )
                lines.append(
                    f"- {key} student, {metric.replace('_', ' ')}: distilled "
                    f"{' / '.join(show(v) for v in runs['distilled'])}; labels-only "
                    f"{' / '.join(show(v) for v in runs['labels_only'])}; distilled better in {wins} of {len(seeds)}"
                )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{name})" for name in report["plots"]]
    lines += ["", "## Saved models", ""]
    lines += [f"- `{path}`: {what}" for path, what in report["saved"].items()]
    return "\n".join(lines) + "\n"


# folder: (the stage that writes it, what it holds)
SAVED = {
    "tokenizer/": ("tokenizer", "AutoTokenizer"),
    "teacher/": ("teacher", "AutoModelForImageTextToText + AutoProcessor (the MoE teacher)"),
    "lora_parity/": ("lora", "PEFT adapter: PeftModel.from_pretrained(teacher, 'lora_parity'); the processor"),
    "students/llama4x/": (
        "distill",
        "AutoModelForImageTextToText + AutoProcessor (dense llama4x student; labels_only/ and the further seeds' "
        "seed_<n>/ inside)",
    ),
    "students/llama/": (
        "distill",
        "AutoModelForCausalLM + AutoTokenizer (LlamaForCausalLM student; labels_only/ and seed_<n>/ inside)",
    ),
}


def write_report(out: str | Path, settings, results: dict[str, Any]) -> dict[str, Any]:
    """Write `report.json`, `report.md` and the plots of the finished stages; return what the report stage records."""
    import dataclasses

    from .data import digits_vqa
    from .monitoring import plot_expert_load

    out = Path(out)
    stages = [name for name in ("tokenizer", "teacher", "evaluate", "lora", "distill") if name in results]
    plots_dir = out / "plots"
    plots = []
    if "teacher" in results:
        plot_loss_curves(results, plots_dir / "loss_curves.png")
        plots.append("loss_curves.png")
    if "evaluate" in results:
        import torch

        load = torch.tensor(results["evaluate"]["routing"]["expert_load"])
        plot_expert_load(load, plots_dir / "expert_load.png", "Teacher: held-out share of tokens per expert")
        _, test = digits_vqa(image_size=settings.image_size)
        plot_digit_answers(test, results, plots_dir / "digits_answers.png")
        plot_accuracy(results, plots_dir / "accuracy.png")
        plots += ["expert_load.png", "accuracy.png", "digits_answers.png"]
    seconds = _stage_seconds(out, stages)
    report = {
        "settings": dataclasses.asdict(settings),
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("llama4x") else None,
        "stage_seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "targets": targets(settings, results),
        "tokenizer": results.get("tokenizer"),
        "teacher": results.get("teacher"),
        "evaluation": results.get("evaluate"),
        "lora": results.get("lora"),
        "distillation": results.get("distill"),
        "plots": plots,
        "saved": {path: what for path, (stage, what) in SAVED.items() if stage in results},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return {"stages": stages, "targets": report["targets"], "plots": plots}


def headline(stage: str, results: dict[str, Any]) -> str:
    """One line of the stage's main result for the summary table."""
    r = results.get(stage)
    if r is None:
        return ""
    if stage == "tokenizer":
        return f"vocab {r['vocab_size']}, {r['train_tokens']:,} train tokens"
    if stage == "teacher":
        return f"{r['steps']} steps, {r['parameters'] / 1e6:.2f}M params ({r['active_parameters'] / 1e6:.2f}M active)"
    if stage == "evaluate":
        routing = r["routing"]
        return (
            f"digits {_pct(r['digits_accuracy'])}, text ppl {r['text_perplexity']:.1f}, max-violation "
            f"{routing['max_violation']:.2f} (bias removed: {routing['max_violation_without_bias']:.2f})"
        )
    if stage == "lora":
        return f"even/odd {_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])}"
    if stage == "distill":
        e = r["evaluation"]
        seeds = _student_seeds(results)
        return (
            f"llama4x digits {_pct(e['llama4x/distilled']['digits_accuracy'])} vs labels-only "
            f"{_pct(e['llama4x/labels_only']['digits_accuracy'])}; llama ppl "
            f"{e['llama/distilled']['text_perplexity']:.1f} vs {e['llama/labels_only']['text_perplexity']:.1f}"
            + (f" (means of {seeds} seeds)" if seeds > 1 else "")
        )
    if stage == "report":
        met = sum(bool(c["met"]) for c in r["targets"].values())
        return f"targets met {met}/{len(r['targets'])}; {len(r['plots'])} plots"
    return ""


def summary_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    """The stage-by-stage summary printed at the end of a run."""
    header = ("stage", "status", "time", "result")
    body = [(row["stage"], row["status"], f"{row['seconds']:.0f} s", headline(row["stage"], results)) for row in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(3)]
    lines = ["", "  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
    lines.append("-" * (sum(widths) + 6 + max((len(line[3]) for line in body), default=6)))
    for line in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(line[:3], widths)) + "  " + line[3])
    return "\n".join(lines)
