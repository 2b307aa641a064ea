"""Render every results table of the docs from the registry (``results/registry.jsonl``).

A table lives between ``<!-- results:NAME -->`` and ``<!-- /results -->`` in README.md, the pages
of docs/, benchmarks/README.md and benchmarks/results/*.md; NAME says what it shows:

- ``headline``: the current figures of the main settings, with the machine of each row;
- ``expect``: what the headline commands gave on each kind of machine (AVX2-only CPU, AVX512-BF16
  CPU, GPU);
- ``paper``: the current figures beside the published ones and their sources;
- ``superseded``: the records that no longer describe the current defaults, and why;
- ``goals``: each goal of ``GOALS`` with, for each variant, the records that answer it and whether
  they meet it;
- ``setting:PREFIX``: every record whose setting starts with PREFIX (a model's page), then their
  commands and notes;
- ``script:NAME``: every record of one benchmark script.

    python benchmarks/render.py            # rewrite the tables in place
    python benchmarks/render.py --check    # exit 1, naming them, if a committed table differs
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # registry.py beside this file, also when imported by path

from registry import GOALS, PUBLISHED, ROOT, Goal, load  # noqa: E402

BLOCK = re.compile(r"(<!-- results:(?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

# the README's table: settings in this order, each with the current records of its defaults
HEADLINE = ["m2_mnist_100", "m2_mnist_3000", "m1m2_mnist_100", "adgm_mnist_100", "sdgm_mnist_100", "vae_mnist", "vae_mnist_ar", "cvae_mnist"]
# what to expect: a command a newcomer runs first, and the setting whose records answer it
EXPECT = [
    ("python train.py experiment=vae_mnist", "vae_mnist"),
    ("python benchmarks/m2_mnist.py --labeled 100 --max-minutes 60", "m2_mnist_100"),
    ("python benchmarks/m2_mnist.py --model sdgm --labeled 100 --max-minutes 60", "sdgm_mnist_100"),
    ("python benchmarks/paper_table.py --rows vae_mnist_ar --minutes 60 --iwae-k 1000 trainer.max_epochs=-1", "vae_mnist_ar"),
]
MACHINES = ["AVX2-only CPU", "AVX512-BF16 CPU", "GPU", "CPU, ISA not recorded"]
# figure keys that the quality tables show in columns of their own
SHOWN = {"metric", "final", "best", "best_by", "best_labels", "best_epoch", "epochs", "seconds_per_epoch", "curves"}


def fmt(value: Any) -> str:
    """A figure as a table cell: numbers without trailing zeros, nothing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {fmt(v)}" for key, v in value.items())
    if isinstance(value, list):
        return " / ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def unit(record: dict) -> str:
    metric = record["figures"].get("metric", "")
    return " %" if metric.endswith("%") else " nats" if metric.endswith("nats") else ""


def machine_class(record: dict) -> str:
    """The kind of machine that decides speed and precision: GPU, AVX512-BF16 CPU, AVX2-only CPU, ..."""
    machine = record["machine"]
    if machine.get("gpu"):
        return "GPU"
    cpu = machine["cpu"]
    cap, isa = cpu.get("isa_cap"), cpu.get("isa")
    if cap:
        return {"AVX2": "AVX2-only CPU", "AVX512_CORE": "AVX-512 CPU without BF16"}.get(cap, f"CPU capped at {cap}")
    if isa is None:
        return "CPU, ISA not recorded"
    if "AVX512-BF16" in isa or "AMX-BF16" in isa:
        return "AVX512-BF16 CPU"
    return "AVX-512 CPU without BF16" if "AVX-512" in isa else "AVX2-only CPU" if "AVX2" in isa else "CPU without AVX2"


def machine_label(record: dict) -> str:
    """The machine in a few words: CPU or GPU model, cores, threads used, speed-relevant ISA."""
    machine, cpu = record["machine"], record["machine"]["cpu"]
    if machine.get("gpu"):
        label = f"{machine['gpu']} ×{machine.get('gpu_count') or 1}"
    else:
        isa = cpu.get("isa")
        features = "ISA not recorded" if isa is None else " ".join(name for name in isa if name != "AVX2" or len(isa) == 1) or "no AVX2"
        label = f"{cpu.get('model') or 'CPU'}, {cpu.get('cores') or '?'} cores, {features}"
        if cpu.get("isa_cap"):
            label += f", oneDNN capped at {cpu['isa_cap']}"
    threads = cpu.get("threads")
    return label + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def shared(record: dict) -> str:
    return {True: "shared", False: "idle", None: "?"}[record.get("shared")]


def seeds(record: dict) -> str:
    return ", ".join(map(str, record["split_seeds"])) if record.get("split_seeds") else "-"


def value(record: dict, which: str) -> str:
    figure = record["figures"].get(which)
    return "-" if figure is None else fmt(figure) + unit(record)


def best_cell(record: dict) -> str:
    figures = record["figures"]
    if figures.get("best") is None:
        return "-"
    how = [f"epoch {figures['best_epoch']}" if figures.get("best_epoch") is not None else None,
           f"by `{figures['best_by']}`" if figures.get("best_by") else None,
           f"{figures['best_labels']:,} labels" if figures.get("best_labels") is not None else None]
    return value(record, "best") + (f" ({', '.join(h for h in how if h)})" if any(how) else "")


def epochs_cell(record: dict) -> str:
    figures = record["figures"]
    if figures.get("epochs") is None:
        return "-"
    return f"{figures['epochs']}" + (f" ({fmt(figures['seconds_per_epoch'])} s)" if figures.get("seconds_per_epoch") else "")


def extra(record: dict, shown: set[str] = SHOWN) -> str:
    """The figures the table's columns (``shown``) leave out, as 'key: value' pairs."""
    return "; ".join(f"{key}: {fmt(v)}" for key, v in record["figures"].items() if key not in shown and v is not None)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |", *("| " + " | ".join(row) + " |" for row in rows)]


def defaults(records: list[dict], setting: str) -> list[dict]:
    """The current records of a setting's defaults (no variant)."""
    return [r for r in records if r["setting"] == setting and r["status"] == "current" and r.get("variant") is None]


def published(setting: str) -> str:
    compared, figure, source = PUBLISHED.get(setting, ("", None, "-"))
    suffix = " %" if compared.endswith("%") else " nats" if compared.endswith("nats") else ""
    return f"{fmt(figure)}{suffix} ({source})" if figure is not None else source


def headline(records: list[dict]) -> list[str]:
    rows = [
        [f"`{setting}`", seeds(r), value(r, "final"), best_cell(r), published(setting), r["budget"] or "-", machine_label(r),
         r["precision"] or "-", shared(r), r["date"][:10], f"`{r['id']}`"]
        for setting in HEADLINE for r in defaults(records, setting)
    ]
    return table(["setting", "split seed", "final checkpoint", "best checkpoint", "published", "budget", "machine", "precision", "load", "date", "record"], rows)


def expect(records: list[dict]) -> list[str]:
    rows = []
    for command, setting in EXPECT:
        cells = []
        for kind in MACHINES:
            found = [r for r in defaults(records, setting) if machine_class(r) == kind]
            cells.append("; ".join(
                f"{value(r, 'final') if r['figures'].get('final') is not None else value(r, 'best')}"
                f" (seed {seeds(r)}, {r['budget']}, {r['precision']}"
                + (f", {fmt(r['figures']['seconds_per_epoch'])} s/epoch" if r["figures"].get("seconds_per_epoch") else "") + ")"
                for r in found) or "not measured")
        rows.append([f"`{command}`", PUBLISHED[setting][0], *cells])
    return table(["command", "figure", *MACHINES], rows)


def paper(records: list[dict]) -> list[str]:
    rows = []
    for setting, (compared, _, source) in PUBLISHED.items():
        found = defaults(records, setting)
        if not found:
            rows.append([f"`{setting}`", compared, "not measured with the current defaults", "-", published(setting), "-", "-", "-", "-"])
        rows += [[f"`{setting}`", compared, value(r, "final"), best_cell(r), published(setting), r["budget"] or "-", machine_label(r),
                  r["precision"] or "-", f"`{r['id']}`"] for r in found]
    return table(["setting", "compared", "ours, final checkpoint", "ours, best checkpoint", "published", "budget", "machine", "precision", "record"], rows)


def superseded(records: list[dict]) -> list[str]:
    rows = [[f"`{r['id']}`", f"`{r['setting']}`", fmt(r.get("variant")), r["figures"].get("metric", "-"),
             value(r, "final"), best_cell(r), r["date"][:10], fmt(r.get("reason")),
             f"`{r['superseded_by']}`" if r.get("superseded_by") else "-"]
            for r in records if r["status"] == "superseded"]
    return table(["record", "setting", "variant", "figure", "final", "best", "date", "why superseded", "superseded by"], rows)


def budget_minutes(record: dict) -> float | None:
    """The budget of a record that ran for a time ("12 minutes"); None for budgets in epochs or steps."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?) minutes?", record.get("budget") or "")
    return float(found.group(1)) if found else None


def goal_figure(record: dict, key: str) -> tuple[bool, float | None]:
    """Whether the record measured ``key`` (``a.b``: ``figures["a"]["b"]``), and its value; None
    when measured but not reached (a time to an accuracy the run never had)."""
    value: Any = record["figures"]
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value if isinstance(value, (int, float)) else None


def answers(goal: Goal, records: list[dict]) -> dict[str | None, dict[int | None, dict]]:
    """variant -> split seed (None without a split) -> the record that answers the goal there, of
    the current records of the goal's setting and kind of machine, within its budget, that measured
    its figure: one that meets the goal (and its stretch), else the one with the most threads, the
    longest budget, the latest."""
    def rank(r: dict) -> tuple:
        figure = goal_figure(r, goal.figure)[1]
        stretch = goal.stretch is not None and goal.met(figure, goal.stretch)
        return goal.met(figure, goal.bound), stretch, r["machine"]["cpu"].get("threads") or 0, budget_minutes(r) or 0, r["date"]

    found: dict[str | None, dict[int | None, dict]] = {}
    for r in records:
        minutes = budget_minutes(r)
        if (r["status"] != "current" or r["setting"] != goal.setting or not goal_figure(r, goal.figure)[0]
                or (goal.machine and machine_class(r) != goal.machine)
                or (goal.minutes is not None and (minutes is None or minutes > goal.minutes))):
            continue
        if goal.split_seeds:
            if len(r["split_seeds"] or []) != 1 or r["split_seeds"][0] not in goal.split_seeds:
                continue
            seed = r["split_seeds"][0]
        else:
            seed = None
        held = found.setdefault(r.get("variant"), {}).get(seed)
        if held is None or rank(r) >= rank(held):
            found[r.get("variant")][seed] = r
    return found


def goal_cells(goal: Goal, by_seed: dict[int | None, dict]) -> tuple[tuple[int, int], str, str]:
    """How many of the goal's seeds one variant meets (and meets at the stretch), its figure on
    each (with the record), and the 'met' cell."""
    def met(bound: float) -> int:
        return sum(goal.met(goal_figure(r, goal.figure)[1], bound) for r in by_seed.values())

    def shown(seed: int | None) -> str:
        r = by_seed.get(seed)
        if r is None:
            return "not measured"
        figure = goal_figure(r, goal.figure)[1]
        return f"{'not reached' if figure is None else fmt(figure) + goal.unit} (`{r['id']}`, {r['budget']})"

    reached, stretched = met(goal.bound), met(goal.stretch) if goal.stretch is not None else 0
    if not goal.split_seeds:
        return (reached, stretched), shown(None), "yes" if reached else "no"
    count = f"{reached} of {len(goal.split_seeds)} seeds"
    if goal.stretch is not None:
        count += f"; stretch: {stretched} of {len(goal.split_seeds)}"
    return (reached, stretched), "; ".join(f"seed {seed}: {shown(seed)}" for seed in goal.split_seeds), count


def goals(records: list[dict]) -> list[str]:
    """Each goal, one row per variant that answers it: the defaults first, then the variants that
    meet it (then its stretch) on the most seeds."""
    rows = []
    for goal in GOALS:
        sign = "≥" if goal.at_least else "≤"
        target = f"{sign} {fmt(goal.bound)}{goal.unit}"
        if goal.stretch is not None:
            target += f" (stretch: {sign} {fmt(goal.stretch)}{goal.unit})"
        where = (goal.machine or "any machine") + (f", within {fmt(goal.minutes)} minutes" if goal.minutes is not None else "")
        found = answers(goal, records)
        if not found:
            rows.append([goal.what, target, where, "-", "not measured", "-"])
        ranked = []
        for variant, by_seed in found.items():
            (count, stretch), cells, met = goal_cells(goal, by_seed)
            ranked.append(((variant is not None, -count, -stretch, variant or ""), [goal.what, target, where, fmt(variant), cells, met]))
        rows += [row for _, row in sorted(ranked, key=lambda item: item[0])]
    return table(["goal", "target", "machine, budget", "variant", "figure (record, its budget)", "met"], rows)


def details(found: list[dict], shown: set[str] = SHOWN) -> list[str]:
    """Each record's command, its figures outside the columns (``shown``) and its notes, one item each."""
    lines = ["", "Commands and notes:", ""]
    for r in found:
        parts = [f"`{r['command']}`"]
        if figures := extra(r, shown):
            parts.append(figures)
        if r.get("notes"):
            parts.append(r["notes"])
        if r.get("source"):
            parts.append(f"from {r['source']}")
        lines.append(f"- `{r['id']}`: " + ". ".join(p.rstrip(". ") for p in parts) + ".")
    return lines


def setting(records: list[dict], prefix: str) -> list[str]:
    found = [r for r in records if (r["setting"] or "").startswith(prefix)]
    rows = [[f"`{r['id']}`", f"`{r['setting']}`", fmt(r.get("variant")), seeds(r), r["figures"].get("metric", "-"), value(r, "final"),
             best_cell(r), epochs_cell(r), r["budget"] or "-", machine_label(r), r["precision"] or "-", shared(r), r["date"][:10], r["status"]]
            for r in found]
    header = ["record", "setting", "variant", "split seed", "figure", "final", "best", "epochs (s each)", "budget", "machine", "precision", "load", "date", "status"]
    return table(header, rows) + details(found)


def script(records: list[dict], name: str) -> list[str]:
    found, shown = [r for r in records if r["script"] == name], {"metric"}  # every other figure goes in the figures column
    rows = [[f"`{r['id']}`", fmt(r.get("variant")), r["figures"].get("metric", "-"), extra(r, shown) or "-", machine_label(r), shared(r), r["date"][:10], r["status"]]
            for r in found]
    return table(["record", "variant", "what", "figures", "machine", "load", "date", "status"], rows) + details(found, shown)


def view(name: str, records: list[dict]) -> str:
    """The markdown of one named table (see the module docstring)."""
    kind, _, argument = name.partition(":")
    views = {"headline": headline, "expect": expect, "paper": paper, "superseded": superseded, "goals": goals}
    if kind in views and not argument:
        lines = views[kind](records)
    elif kind == "setting":
        lines = setting(records, argument)
    elif kind == "script":
        lines = script(records, argument)
    else:
        raise ValueError(f"Unknown results table {name!r}: use headline, expect, paper, superseded, goals, setting:PREFIX or script:NAME")
    return "\n".join(lines) + "\n"


def render(text: str, records: list[dict]) -> str:
    """``text`` with every results block replaced by the table its name asks for."""
    return BLOCK.sub(lambda m: m.group(1) + view(m.group("name"), records) + m.group(4), text)


def documents(root: Path = ROOT) -> list[Path]:
    """The files that may hold results blocks."""
    return [root / "README.md", root / "benchmarks" / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "benchmarks" / "results").glob("*.md"))]


def stale(root: Path = ROOT, registry: Path | None = None) -> list[Path]:
    """The documents whose results blocks differ from what the registry renders."""
    records = load(registry)
    return [path for path in documents(root) if path.is_file() and render(path.read_text(), records) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed table differs from the registry")
    parser.add_argument("--registry", type=Path, default=None, help="the registry to read (default: VAELAB_REGISTRY, else results/registry.jsonl)")
    args = parser.parse_args(argv)
    differing = stale(registry=args.registry)
    if args.check:
        for path in differing:
            print(f"{path.relative_to(ROOT)}: a results table differs from the registry; run python benchmarks/render.py", file=sys.stderr)
        return 1 if differing else 0
    records = load(args.registry)
    for path in differing:
        path.write_text(render(path.read_text(), records))
        print(f"rendered {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
