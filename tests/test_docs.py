"""The docs cannot drift: every train/evaluate command shown in README.md and docs/ composes, and
every relative link and every repository path they mention exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import REPO_ROOT
from vaelab.utils import CONFIG_DIR

PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
RESULTS = re.compile(r"<!-- results:[^ ]+ -->\n.*?<!-- /results -->", re.S)  # rendered records: history, not instructions
ENTRY = re.compile(r"(?:python3? (?:-m )?)?(train\.py|evaluate\.py|vaelab\.train|vaelab\.evaluate|vaelab\.classifier|vaelab-train|vaelab-evaluate)\b")
CONFIGS = {"train.py": "train", "vaelab.train": "train", "vaelab-train": "train", "evaluate.py": "evaluate",
           "vaelab.evaluate": "evaluate", "vaelab-evaluate": "evaluate", "vaelab.classifier": "classifier"}
CHECKPOINT_KEYS = ("ckpt_path", "stages.m1.ckpt")
# top-level folders whose paths the docs name as files of the repository
REPO_DIRS = ("src/", "benchmarks/", "tests/", "docs/", "sweeps/", ".ci/")
# what a run writes: paths inside a run directory, not the repository's
RUN_PATHS = (".hydra/", "outputs/", "data/", "checkpoints/", "csv/", "wandb/", "images/", "figures/")
PACKAGE_DIRS = (REPO_ROOT / "src", REPO_ROOT / "src" / "vaelab", REPO_ROOT / "src" / "vaelab" / "conf")


def commands(text: str) -> list[str]:
    """The train/evaluate command lines in a page: lines of its code blocks (continuations joined,
    comments dropped) and inline code spans, outside rendered results tables."""
    text = RESULTS.sub("", text)
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(re.split(r"\s+#\s", line)[0].strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`([^`\n]+)`", prose)
    return [c for c in found if ENTRY.search(c)]


def invocation(command: str) -> tuple[str, list[str]]:
    """The config a command composes and its overrides: environment assignments, other commands of
    an ``&&`` chain, ``-m`` and ``--cfg job`` dropped; ``<...>`` placeholders left in."""
    part = re.sub(r"(^|\s)<[^<>=/]*>(?=\s|$)", " ", next(p for p in command.split("&&") if ENTRY.search(p)))  # "<the same overrides>"
    words = shlex.split(part[ENTRY.search(part).start():])
    script = ENTRY.match(" ".join(words[:3])).group(1)
    words = words[1:] if words[0] in CONFIGS or words[0].endswith(".py") else words[3 if words[1] == "-m" else 2:]
    overrides, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("-m", "--multirun"):
            continue
        elif word in ("--cfg", "-c"):
            skip = True
        else:
            overrides.append(word)
    return CONFIGS[script], overrides


def concrete(overrides: list[str], checkpoint: Path) -> tuple[list[str], list[str]]:
    """Overrides that compose: placeholders replaced (a real file for checkpoints), a sweep's
    first value; and the keys of search spaces (Optuna's intervals), which must exist."""
    filled = []
    for text in overrides:
        key, _, value = text.partition("=")
        if "<" in value and (CONFIG_DIR / key).is_dir():  # a template's config choice, "model=<name>"
            continue
        if "<" in value:
            value = checkpoint if key.lstrip("+~") in CHECKPOINT_KEYS else "x"
        filled.append(f"{key}={value}" if _ else text)
    result, keys = [], []
    for override in OverridesParser.create().parse_overrides(filled):
        key = override.get_key_element()
        text = override.input_line
        if override.is_sweep_override():
            if override.is_interval_sweep() or "tag(" in text:
                keys.append(key)
                continue
            text = f"{key}={next(override.sweep_string_iterator())}"
        result.append(text)
    return result, keys


DOCUMENTED = sorted({(page.relative_to(REPO_ROOT).as_posix(), c) for page in PAGES for c in commands(page.read_text())})


def test_the_docs_show_commands_of_every_kind():
    shown = " ".join(c for _, c in DOCUMENTED)
    for needed in ("train.py -m", "evaluate.py ckpt_path=", "hydra/launcher=slurm", "hparams_search=ssvae_optuna", "ckpt_path=outputs/train/runs"):
        assert needed in shown, needed


@pytest.mark.parametrize("page,command", DOCUMENTED, ids=[f"{p}: {c[:60]}" for p, c in DOCUMENTED])
def test_every_documented_command_composes(page, command, tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    name, overrides = invocation(command)
    overrides, keys = concrete(overrides, checkpoint)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides, return_hydra_config=True)
    for key in keys:
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key in str(OmegaConf.to_yaml(cfg.hydra.sweeper)), (page, key)


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: dead link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {path or page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_repository_path_exists(page):
    for span in re.findall(r"`([^`\n]+)`", page.read_text()):
        if "<" in span or "*" in span or " " in span or not re.fullmatch(r"[\w./@-]+", span):
            continue
        if span.startswith(REPO_DIRS):
            assert (REPO_ROOT / span).exists(), f"{page.name}: {span} does not exist"
        elif "/" in span and not span.startswith(RUN_PATHS) and re.search(r"\.(py|yaml)$", span):  # relative to the package, e.g. vaelab/search.py
            assert any((base / span).exists() for base in PACKAGE_DIRS), f"{page.name}: {span} does not exist"


def test_the_readme_keeps_the_install_and_test_lines():
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert lines[lines.index("# run the tests") + 1] == 'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[dev]" && pytest'
    assert lines[lines.index("# train the default VAE on MNIST") + 1].endswith("pip install -c constraints.txt -e . && python train.py")
