"""The results registry and the tables rendered from it: the committed tables are what the
registry renders, a hand-edited one is caught, records carry what a table needs."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
registry = importlib.import_module("registry")
render = importlib.import_module("render")

BLOCK = re.compile(r"<!-- results:[^ ]+ -->\n.*?<!-- /results -->", re.S)
FIGURE = re.compile(r"\b\d+(?:\.\d+)?\s?(?:%|nats\b)")


def test_the_committed_tables_are_what_the_registry_renders():
    assert render.stale(registry=registry.REGISTRY) == [], "run python benchmarks/render.py"


def test_a_hand_edited_table_is_caught(tmp_path):
    shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    block = BLOCK.search(text).group(0)
    edited = block.replace(" %", "0 %", 1)
    assert edited != block
    (tmp_path / "README.md").write_text(text.replace(block, edited))
    assert render.stale(tmp_path, registry=registry.REGISTRY) == [tmp_path / "README.md"]
    assert render.main(["--check"]) == 0  # the committed files are untouched


def test_an_unknown_table_name_is_refused():
    with pytest.raises(ValueError, match="Unknown results table 'nonsense'"):
        render.render("<!-- results:nonsense -->\n<!-- /results -->", [])


def test_every_record_says_what_ran_where_and_how():
    records = registry.load(registry.REGISTRY)
    status = {r["id"]: r["status"] for r in records}
    required = {"id", "script", "setting", "variant", "command", "overrides", "commit", "date", "machine", "precision",
                "seeds", "split_seeds", "budget", "shared", "figures", "notes", "status"}
    for record in records:
        assert required <= record.keys(), (record["id"], required - record.keys())
        assert {"cpu", "gpu", "gpu_count", "torch", "lightning"} <= record["machine"].keys(), record["id"]
        assert {"model", "cores", "threads", "isa"} <= record["machine"]["cpu"].keys(), record["id"]
        assert record["status"] in ("current", "superseded"), record["id"]
        if record["status"] == "superseded":
            assert record["reason"], record["id"]
            # a replacement that was itself replaced would send a reader to a figure no longer current
            assert record["superseded_by"] is None or status.get(record["superseded_by"]) == "current", record["id"]
        if record.get("migrated"):
            assert record["source"], record["id"]


def test_the_superseded_paper_table_row_is_marked_and_the_headline_m2_row_names_its_machine():
    records = {r["id"]: r for r in registry.load(registry.REGISTRY)}
    old = next(r for r in records.values() if r["setting"] == "m2_mnist_100" and r["figures"].get("best") == 27.22)
    assert old["status"] == "superseded" and records[old["superseded_by"]]["status"] == "current"
    headline = render.headline(list(records.values()))
    m2 = next(line for line in headline if line.startswith("| `m2_mnist_100`"))
    assert "AVX2" in m2 and "32-true" in m2  # the first current M2 record: 12 minutes on an AVX2 CPU, float32


def test_results_files_hold_only_rendered_tables():
    for path in (REPO_ROOT / "benchmarks" / "results").glob("*.md"):
        outside = BLOCK.sub("", path.read_text())
        assert not re.search(r"^\|", outside, re.M), f"{path.name} holds a table outside the results markers"


def test_no_result_figure_is_typed_into_the_docs():
    for path in render.documents():
        prose = re.sub(r"```.*?```", "", BLOCK.sub("", path.read_text()), flags=re.S)
        found = FIGURE.findall(prose)
        assert not found, f"{path.relative_to(REPO_ROOT)} types figures by hand: {found}; add a record and render it"


def test_append_writes_a_record_where_vaelab_registry_points(tmp_path, monkeypatch):
    target = tmp_path / "registry.jsonl"
    monkeypatch.setenv("VAELAB_REGISTRY", str(target))
    record = registry.append("m2_mnist.py", {"metric": "test error, %", "final": 9.5, "best": 9.0, "best_by": "val/elbo", "best_labels": 0},
                             overrides=["model=ssvae"], precision="32-true", seeds=[42], split_seeds=[0], budget="1 minute",
                             shared=True, setting="m2_mnist_100")
    assert registry.load() == [record] == [json.loads(target.read_text())]
    assert record["machine"]["cpu"]["cores"] and isinstance(record["machine"]["cpu"]["isa"], list)
    assert record["status"] == "current" and record["setting"] == "m2_mnist_100"
    row = render.headline([record])[-1]
    assert "9.5 %" in row and "11.97 %" in row  # beside the published figure


def test_render_places_each_kind_of_machine_in_its_column():
    cpu = {"model": "x", "cores": 2, "threads": 1, "isa": ["AVX2"], "isa_cap": None}
    record = {"machine": {"cpu": cpu, "gpu": None}}
    assert render.machine_class(record) == "AVX2-only CPU"
    cpu["isa"] = ["AVX2", "AVX-512", "AVX512-BF16"]
    assert render.machine_class(record) == "AVX512-BF16 CPU"
    cpu["isa_cap"] = "AVX2"
    assert render.machine_class(record) == "AVX2-only CPU"
    assert render.machine_class({"machine": {"cpu": {**cpu, "isa": None}, "gpu": "H100"}}) == "GPU"
    assert render.machine_class({"machine": {"cpu": {**cpu, "isa": None, "isa_cap": None}, "gpu": None}}) == "CPU, ISA not recorded"


def test_a_scripts_table_shows_every_figure_but_its_metric():
    """A script's table has no columns for epochs or final figures: they go in its figures column."""
    record = {"id": "abc", "script": "gpu.py", "variant": None, "command": "python benchmarks/gpu.py", "date": "2026-12-04",
              "status": "current", "shared": False, "machine": {"cpu": {"threads": 4}, "gpu": "H200", "gpu_count": 1},
              "figures": {"metric": "seconds", "epochs": {"vae": 2.5}, "final": 1.25}}
    lines = render.script([record], "gpu.py")
    row, note = lines[2], lines[-1]
    for text in (row, note):
        assert "epochs: vae 2.5" in text and "final: 1.25" in text and "metric:" not in text
    assert "| seconds |" in row


def test_the_benchmark_scripts_append_to_the_registry():
    for name in ("m2_mnist", "paper_table", "search_pruning", "m1_features", "data_path"):
        source = (REPO_ROOT / "benchmarks" / f"{name}.py").read_text()
        assert "from registry import" in source and "append(" in source, name
    assert importlib.util.find_spec("registry") is not None


def goal_record(seed: int, final: float | None, *, budget: str = "60 minutes", threads: int = 2, isa: list[str] | None = None,
                status: str = "current", variant: str | None = None, date: str = "2026-12-01") -> dict:
    return {"id": f"s{seed}-{final}-{budget[:2]}-{threads}-{status[:3]}", "setting": "m2_mnist_100", "variant": variant,
            "status": status, "split_seeds": [seed], "budget": budget, "date": date,
            "machine": {"cpu": {"threads": threads, "isa": isa or ["AVX2"], "isa_cap": None}, "gpu": None},
            "figures": {"final": final, "minutes_to_val_acc": {"88": final}}}


def test_a_goal_counts_the_seeds_its_records_meet_within_its_machine_and_budget(monkeypatch):
    goal = registry.Goal("M2: final test error", "m2_mnist_100", "final", 8, " %", machine="AVX2-only CPU", minutes=60,
                         split_seeds=(0, 1, 2), stretch=5)
    monkeypatch.setattr(render, "GOALS", [goal])
    records = [
        goal_record(0, 4.0),
        goal_record(1, 9.0, threads=2),
        goal_record(1, 7.5, budget="45 minutes", threads=1),  # one core, less time, and still met: it answers seed 1
        goal_record(2, 9.5),
        goal_record(2, 3.0, budget="90 minutes"),  # beyond the budget
        goal_record(2, 2.0, isa=["AVX2", "AVX-512", "AVX512-BF16"]),  # another kind of machine
        goal_record(2, 1.0, status="superseded"),
        goal_record(0, 4.5, variant="lit.ema_decay=0.999"),
        goal_record(0, 6.0, variant="a.first_by_name=1"),  # as many seeds met, none at the stretch: after it
        goal_record(0, 7.0, variant="z.last_by_name=1"), goal_record(1, 7.0, variant="z.last_by_name=1"),  # more seeds: first
    ]
    header, _, defaults, *variants = render.goals(records)
    assert [row.split(" | ")[3] for row in variants] == ["z.last_by_name=1", "lit.ema_decay=0.999", "a.first_by_name=1"]
    variant = variants[1]
    assert "≤ 8 % (stretch: ≤ 5 %)" in defaults and "| - |" in defaults
    assert "seed 1: 7.5 % (`s1-7.5-45-1-cur`, 45 minutes)" in defaults
    assert "seed 2: 9.5 % (`s2-9.5-60-2-cur`, 60 minutes)" in defaults
    assert defaults.endswith("| 2 of 3 seeds; stretch: 1 of 3 |")
    assert "lit.ema_decay=0.999" in variant and "seed 1: not measured" in variant
    assert variant.endswith("| 1 of 3 seeds; stretch: 1 of 3 |")


def test_a_time_never_reached_fails_its_goal_and_an_unanswered_goal_says_so(monkeypatch):
    reached = registry.Goal("M2: 88 % validation accuracy", "m2_mnist_100", "minutes_to_val_acc.88", 12, " min", split_seeds=(0, 1))
    fast = registry.Goal("VAE epoch", "gpu", "train_epoch_s.vae", 1, " s", machine="GPU")
    monkeypatch.setattr(render, "GOALS", [reached, fast])
    rows = render.goals([goal_record(0, None, budget="2 epochs"), goal_record(1, 11.0)])[2:]
    assert "seed 0: not reached" in rows[0] and rows[0].endswith("| 1 of 2 seeds |")
    assert "| VAE epoch |" in rows[1] and "not measured" in rows[1]
    assert render.budget_minutes({"budget": "4.5 minutes"}) == 4.5 and render.budget_minutes({"budget": "300 steps"}) is None
