"""Tests for `llama4x demo`: the quick run end to end in a subprocess (outputs, finite numbers, loadable models,
resuming), and the stage orchestration (skip, redo, failure, settings) with stand-in stages."""

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

import llama4x
from llama4x import demo
from llama4x.checkpoints import write_json_atomically
from llama4x.cli import main
from llama4x.data import block_batches
from llama4x.evaluation import perplexity

pytest.importorskip("sklearn", reason="the demo's digits data needs scikit-learn (the `demo` extra)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _llama4x(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "llama4x"
    assert script.exists(), f"console script {script} is missing: install the package (bash scripts/setup.sh)"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`llama4x demo --quick` once, in a subprocess; yields (folder, report.json, completed process, seconds)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    start = time.perf_counter()
    proc = _llama4x("demo", "--quick", "--out", str(out))
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, json.loads((out / "report.json").read_text()), proc, seconds


def _numbers(value, path=""):
    """Every int / float in a JSON value, with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def test_quick_demo_writes_report_plots_and_models(quick_run):
    out, report, proc, _ = quick_run
    for name in ["report.md", "report.json", "settings.json", "tokenizer/tokenizer.json", "teacher/config.json",
                 "teacher/processor_config.json", "lora_parity/adapter_config.json", "students/llama4x/config.json",
                 "students/llama4x/labels_only/config.json", "students/llama/config.json"]:  # fmt: skip
        assert (out / name).is_file(), f"{name} missing from {sorted(str(p.relative_to(out)) for p in out.rglob('*'))}"
    for stage in demo.STAGES:
        assert (out / "stages" / f"{stage}.json").is_file(), stage
    assert report["plots"] == ["loss_curves.png", "expert_load.png", "accuracy.png", "digits_answers.png"]
    for plot in report["plots"]:
        assert (out / "plots" / plot).read_bytes()[:8] == PNG_MAGIC, plot
        assert f"plots/{plot}" in (out / "report.md").read_text()
    # The stage summary table closes the output, one row per stage.
    for stage in demo.STAGES:
        assert any(line.startswith(f"{stage} ") and " done " in line for line in proc.stdout.splitlines()), stage


def test_quick_demo_numbers_are_finite_and_in_range(quick_run):
    _, report, _, _ = quick_run
    numbers = list(_numbers(report))
    assert len(numbers) > 100
    bad = [(path, value) for path, value in numbers if not math.isfinite(value)]
    assert not bad, bad[:10]
    evaluation, lora = report["evaluation"], report["lora"]
    assert 1.0 < evaluation["text_perplexity"] < evaluation["uniform_perplexity"]
    assert 0.0 <= evaluation["digits_accuracy"] <= 1.0
    assert evaluation["digits_accuracy"] > 0.2, "the quick teacher should read digits well above chance (10%)"
    assert 0.0 <= lora["accuracy_before"] <= 1.0 and 0.0 <= lora["accuracy_after"] <= 1.0
    assert evaluation["routing"]["max_violation"] >= 0.0
    students = report["distillation"]["evaluation"]
    assert set(students) == {"teacher", "llama4x/distilled", "llama4x/labels_only", "llama/distilled",
                             "llama/labels_only"}  # fmt: skip
    assert report["teacher"]["active_parameters"] < report["teacher"]["parameters"]
    assert set(report["targets"]) >= {"teacher digits accuracy", "LoRA even/odd accuracy"}


def test_quick_demo_models_load_with_the_auto_classes_and_reproduce_the_report(quick_run):
    from peft import PeftModel

    out, report, _, _ = quick_run
    teacher = AutoModelForImageTextToText.from_pretrained(out / "teacher")
    processor = AutoProcessor.from_pretrained(out / "teacher")
    assert isinstance(teacher, llama4x.Llama4XForConditionalGeneration)
    assert isinstance(processor, llama4x.Llama4XProcessor)
    assert teacher.config.text_config.num_local_experts == 16 and teacher.config.text_config.num_experts_per_tok == 1
    text = teacher.config.text_config
    assert "chunked_attention" in text.layer_types and text.attention_chunk_size < report["settings"]["block_size"]
    assert text.router_bias_update_rate > 0

    # The reloaded teacher gives the reported held-out perplexity: the saved weights are the evaluated ones.
    settings = demo.DemoSettings(**report["settings"])
    blocks = demo.DemoData(settings).text_blocks(processor.tokenizer, "eval")
    reloaded = perplexity(teacher, block_batches(blocks))
    assert reloaded == pytest.approx(report["evaluation"]["text_perplexity"], rel=1e-4)

    adapted = PeftModel.from_pretrained(teacher, out / "lora_parity")
    assert any("lora_" in name for name, _ in adapted.named_parameters())
    student = AutoModelForImageTextToText.from_pretrained(out / "students" / "llama4x")
    assert student.config.text_config.moe_layers == [] and hasattr(student.model, "vision_model")
    assert isinstance(AutoProcessor.from_pretrained(out / "students" / "llama4x"), llama4x.Llama4XProcessor)
    llama = AutoModelForCausalLM.from_pretrained(out / "students" / "llama")
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert len(AutoTokenizer.from_pretrained(out / "students" / "llama")) == llama.config.vocab_size


def test_students_of_several_seeds_are_saved_and_reported_by_their_mean(quick_run, tmp_path):
    """`distill_seeds=2`: each pair is trained per seed (different data orders and digits subsets, so different
    students), saved in its own folder, and the report's rows are the means of the per-seed values, which are
    listed."""
    import shutil

    from llama4x import demo_report

    out, report, _, _ = quick_run
    for folder in ("tokenizer", "teacher"):
        shutil.copytree(out / folder, tmp_path / folder)
    fields = {**report["settings"], "distill_seeds": 2, "distill_steps": 3, "eval_digits": 12, "eval_text_blocks": 4}
    run = demo.DemoRun(tmp_path, demo.DemoSettings(**fields), verbose=False)
    result = demo.stage_distill(run)

    assert demo.student_folder(run, "llama4x", 0) == tmp_path / "students" / "llama4x"
    seed_1 = tmp_path / "students" / "llama4x" / "seed_1"
    first = AutoModelForImageTextToText.from_pretrained(tmp_path / "students" / "llama4x")
    second = AutoModelForImageTextToText.from_pretrained(seed_1)
    assert (seed_1 / "labels_only" / "config.json").is_file()
    assert any(not a.equal(b) for a, b in zip(first.parameters(), second.parameters())), "seed 1 repeats seed 0"
    assert result["students"]["llama4x"]["seeds"] == [0, 1]
    assert result["students"]["llama4x"]["train_examples"] == round(1438 * run.settings.distill_digits_fraction)
    for key in ("llama4x/distilled", "llama4x/labels_only", "llama/distilled", "llama/labels_only"):
        entry = result["evaluation"][key]
        for metric, values in entry["per_seed"].items():
            assert len(values) == 2 and entry[metric] == pytest.approx(sum(values) / 2), (key, metric)
    # seed 0's saved distilled student gives its listed perplexity
    blocks = demo.DemoData(run.settings).text_blocks(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), "eval")
    assert perplexity(first, block_batches(blocks)) == pytest.approx(
        result["evaluation"]["llama4x/distilled"]["per_seed"]["text_perplexity"][0], rel=1e-5
    )

    written = demo_report.write_report(tmp_path, dataclasses.replace(run.settings, quick=False), {"distill": result})
    text = (tmp_path / "report.md").read_text()
    assert "Per seed (0, 1):" in text and "the student rows are the means over those seeds" in text
    assert "llama4x student digits accuracy: distilled vs labels-only (means of 2 seeds)" in written["targets"]


def test_generate_command_runs_the_demos_text_student(quick_run, capsys):
    out, _, _, _ = quick_run
    folder = out / "students" / "llama"
    assert main(["generate", "--model", str(folder), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert printed == tokenizer.decode(ids[0], skip_special_tokens=True) + "\n"


def test_generate_command_answers_an_image_question_as_the_evaluation_does(quick_run, capsys, tmp_path):
    from llama4x.evaluation import answer_questions

    out, report, _, _ = quick_run
    teacher = out / "teacher"
    records = demo.DemoData(demo.DemoSettings(**report["settings"])).digits[1][:3]
    model, processor = AutoModelForImageTextToText.from_pretrained(teacher), AutoProcessor.from_pretrained(teacher)
    expected = answer_questions(model, processor, records)
    for i, record in enumerate(records):
        path = tmp_path / f"scan_{i}.png"
        record["image"].save(path)  # PNG: lossless, the very pixels the evaluation read
        argv = ["generate", "--model", str(teacher), "--image", str(path), "--prompt", record["question"],
                "--max-new-tokens", "4"]  # fmt: skip
        assert main(argv) == 0
        assert capsys.readouterr().out == expected[i] + "\n"

    # the LoRA adapter folder, on the teacher it names, answers the even/odd question as its evaluation does
    from peft import PeftModel

    from llama4x.data import parity_records

    question = parity_records(records[:1])
    expected = answer_questions(PeftModel.from_pretrained(model, out / "lora_parity"), processor, question)
    argv = ["generate", "--model", str(out / "lora_parity"), "--image", str(tmp_path / "scan_0.png"), "--prompt",
            question[0]["question"], "--max-new-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    text_only = ["generate", "--model", str(out / "students" / "llama"), "--image", str(path), "--prompt", "x"]
    assert main(text_only) == 1
    assert "--image needs a multimodal llama4x model" in capsys.readouterr().err
    missing = ["generate", "--model", str(teacher), "--image", str(tmp_path / "none.png"), "--prompt", "x"]
    assert main(missing) == 1
    assert f"Image file {tmp_path / 'none.png'} does not exist" in capsys.readouterr().err


def test_quick_demo_rerun_skips_every_finished_stage(quick_run):
    out, report, _, _ = quick_run
    markers = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    proc = _llama4x("demo", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in demo.STAGES:
        assert any(line.startswith(f"{stage} ") and "skipped" in line for line in proc.stdout.splitlines()), stage
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == markers
    assert json.loads((out / "report.json").read_text()) == report

    # A run with other settings into the same folder is refused, with the differences named.
    proc = _llama4x("demo", "--quick", "--seed", "1", "--out", str(out))
    assert proc.returncode == 1
    assert "other settings" in proc.stderr and "seed" in proc.stderr and "Traceback" not in proc.stderr


# ---- orchestration, with stand-in stages ----------------------------------------------------------------------------


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage by a stand-in that records its calls; `fail` names a stage that raises."""
    calls, fail = [], set()

    def make(name):
        def stage(run):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"{name} broke")
            if name == "report":
                return {"stages": [s for s in demo.STAGES[:-1] if s in run.results], "targets": {}, "plots": []}
            return {"value": len(calls)}

        return stage

    monkeypatch.setattr(demo, "STAGE_FUNCTIONS", {name: make(name) for name in demo.STAGES})
    monkeypatch.setattr("llama4x.demo_report.headline", lambda stage, results: "")
    return calls, fail


def test_minutes_scales_every_training_stage_by_the_teachers_measured_factor(tmp_path):
    """`--minutes`: the teacher stage times a few steps and scales its step count to its share of the budget; LoRA
    (and distillation) scale theirs by the same factor. Checks the plumbing, not the clock."""
    settings = demo.DemoSettings.create(quick=True, minutes=0.3)
    results = demo.run_demo(tmp_path, settings, stop_after="lora", verbose=False)
    teacher, lora = results["teacher"], results["lora"]
    scale = teacher["step_scale"]
    assert 0.05 <= scale <= 5.0 and scale != 1.0 and teacher["measured_seconds_per_step"] > 0
    assert teacher["steps"] == max(5, round(settings.teacher_steps * scale))
    assert lora["steps"] == max(5, round(settings.lora_steps * scale))


def test_stages_run_in_order_then_are_skipped_and_a_redone_stage_redoes_the_later_ones(tmp_path, fake_stages):
    calls, _ = fake_stages
    settings = demo.DemoSettings.create(quick=True)
    demo.run_demo(tmp_path, settings, verbose=False)
    assert calls == list(demo.STAGES)
    calls.clear()
    results = demo.run_demo(tmp_path, settings, verbose=False)
    assert calls == [] and results["teacher"] == {"value": 2}
    (tmp_path / "stages" / "lora.json").unlink()
    demo.run_demo(tmp_path, settings, verbose=False)
    assert calls == ["lora", "distill", "report"]


def test_stop_after_runs_the_first_stages_and_the_report_and_a_full_rerun_continues(tmp_path, fake_stages):
    calls, _ = fake_stages
    settings = demo.DemoSettings.create(quick=True)
    results = demo.run_demo(tmp_path, settings, stop_after="evaluate", verbose=False)
    assert calls == ["tokenizer", "teacher", "evaluate", "report"]
    assert results["report"]["stages"] == ["tokenizer", "teacher", "evaluate"]
    calls.clear()
    demo.run_demo(tmp_path, settings, verbose=False)
    assert calls == ["lora", "distill", "report"]


def test_a_redone_stage_stopped_early_leaves_no_later_marker_for_the_next_run_to_skip(tmp_path, fake_stages):
    calls, _ = fake_stages
    settings = demo.DemoSettings.create(quick=True)
    demo.run_demo(tmp_path, settings, verbose=False)
    (tmp_path / "stages" / "teacher.json").unlink()  # redo the teacher, but only the teacher this time
    demo.run_demo(tmp_path, settings, stop_after="teacher", verbose=False)
    calls.clear()
    demo.run_demo(tmp_path, settings, verbose=False)  # evaluate, lora and distill used the old teacher
    assert calls == ["evaluate", "lora", "distill", "report"]


def test_a_failed_stage_names_itself_keeps_the_finished_stages_and_resumes_there(tmp_path, fake_stages):
    calls, fail = fake_stages
    settings = demo.DemoSettings.create(quick=True)
    fail.add("lora")
    with pytest.raises(demo.DemoStageError, match=r"stage 4 \(lora\) failed: RuntimeError: lora broke") as info:
        demo.run_demo(tmp_path, settings, verbose=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sorted(p.stem for p in (tmp_path / "stages").glob("*.json")) == ["evaluate", "teacher", "tokenizer"]
    fail.clear()
    calls.clear()
    demo.run_demo(tmp_path, settings, verbose=False)
    assert calls == ["lora", "distill", "report"]


def test_cli_demo_failure_exits_1_with_a_one_line_error(tmp_path, fake_stages, capsys):
    _, fail = fake_stages
    fail.add("teacher")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 2 (teacher) failed" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err


def test_other_settings_in_the_same_folder_are_refused(tmp_path, fake_stages):
    demo.run_demo(tmp_path, demo.DemoSettings.create(quick=True), verbose=False)
    with pytest.raises(ValueError, match=r"other settings \(quick: True there, False now"):
        demo.run_demo(tmp_path, demo.DemoSettings.create(quick=False), verbose=False)


def test_report_times_and_saved_models_are_those_of_the_reported_stages_only(tmp_path):
    from llama4x.demo_report import write_report

    # A folder where a full run was done before a rerun with --stop-after tokenizer: old markers and models remain.
    for stage, seconds in (("tokenizer", 2.0), ("teacher", 30.0), ("lora", 5.0), ("report", 3.0)):
        write_json_atomically(
            tmp_path / "stages" / f"{stage}.json", {"stage": stage, "seconds": seconds, "result": {}}
        )
    for folder in ("tokenizer", "teacher", "lora_parity"):
        (tmp_path / folder).mkdir()
    tokenizer = {"vocab_size": 2048, "special_tokens": {}, "train_documents": 71, "eval_documents": 8,
                 "train_tokens": 1000, "eval_tokens": 100, "eval_chars_per_token": 3.5, "round_trip": True}  # fmt: skip
    write_report(tmp_path, demo.DemoSettings.create(quick=True), {"tokenizer": tokenizer})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stage_seconds"] == {"tokenizer": 2.0} and report["total_seconds"] == 2.0
    assert list(report["saved"]) == ["tokenizer/"]
    assert "| teacher |" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"fusion": "cross"}, "fusion"),
        ({"minutes": 0}, "minutes"),
        ({"teacher_steps": 0}, "teacher_steps"),
        ({"attention_chunk_size": 128}, "attention_chunk_size"),
        ({"distill_digits_fraction": 1.5}, "distill_digits_fraction"),
        ({"distill_digits_fraction": 0}, "distill_digits_fraction"),
        ({"seed": 2**32 - 2}, "seed"),  # the third student seed would be 2**32
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        demo.DemoSettings.create(**overrides)


def test_shifted_scan_moves_the_pixels_and_fills_with_white():
    import random

    import numpy as np
    from PIL import Image

    pixels = np.full((8, 8, 3), 255, dtype=np.uint8)
    pixels[3, 4] = 0
    record = {"image": Image.fromarray(pixels), "question": "q", "answer": "1"}
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        moved = np.asarray(demo.shifted(record, rng, 1)["image"])
        assert moved.shape == (8, 8, 3) and (moved == 0).sum() == 3, "one black pixel (3 channels), the rest white"
        row, col = np.argwhere(moved[..., 0] == 0)[0]
        assert abs(row - 3) <= 1 and abs(col - 4) <= 1
        seen.add((int(row), int(col)))
    assert len(seen) == 9, seen


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert demo.lr_factor(0.0) < 0.05
    assert demo.lr_factor(0.05) == pytest.approx(1.0)
    assert demo.lr_factor(1.0) == pytest.approx(0.1)
    values = [demo.lr_factor(i / 100) for i in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
