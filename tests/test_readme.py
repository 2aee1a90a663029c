"""Every command of the README is tested: run here with tiny settings, parsed by the real command-line
parser, or mapped to the existing test that runs its equivalent. A README command that no rule covers
fails `test_every_readme_command_has_a_rule`; a rule whose test no longer exists fails too.

The commands run in a scratch workspace: symlinks to the code, a small toy `params.yaml` (the repo's
own, with a small toy world) and nothing else, so relative paths resolve as in a checkout and nothing
is written into the checkout. Substitutions (the only ones): `/mnt/shared` -> the workspace's
`shared/`, `HEAD`/`$SDXL`/`$IMAGE_ENCODER`/`$NODE_RANK` -> placeholders of the right kind, and the
data build gets `--runner local` (the same stages without Ray; the Ray paths have their own tests).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.pipelines.helpers import read_stats, toy_params, write_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = REPO / "README.md"
SHELL_LANGS = {"bash", "sh", "shell"}
OTHER_LANGS = {"python", "text"}  # python: mapped as a whole block; text: listings, not commands
# What the README's placeholders stand for here.
SHELL_VARS = {"SDXL": "/models/sdxl", "IMAGE_ENCODER": "/models/image_encoder", "NODE_RANK": "0"}


@dataclass(frozen=True)
class Command:
    line: int  # README line of its first line
    lang: str
    text: str  # continuation lines joined, comments removed (python: the whole block)


def strip_comment(line: str) -> str:
    """The line without a shell comment: a `#` outside quotes at the start of a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, language, lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((i + 1, match.group(1), lines[i + 1 : end]))
            i = end
        i += 1
    return blocks


def readme_commands(text: str) -> list[Command]:
    out: list[Command] = []
    for start, lang, lines in fenced_blocks(text):
        if lang in SHELL_LANGS:
            pending, first = "", 0
            for offset, raw in enumerate(lines, start + 1):
                line = strip_comment(raw)
                if not pending:
                    first = offset
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                    continue
                command = (pending + line.strip()).strip()
                pending = ""
                if command:
                    out.append(Command(first, lang, command))
        elif lang == "python":
            out.append(Command(start + 1, lang, "\n".join(lines)))
        elif lang not in OTHER_LANGS:
            # An unlabelled block would escape this test: every block says what it is.
            out.append(Command(start, lang or "(none)", "\n".join(lines)))
    return out


# ---- what each kind of command is checked against -----------------------------------------------


@dataclass
class Workspace:
    root: Path  # a checkout without data: code symlinks + a toy params.yaml
    exports: set[str]  # --out folders of the README's export commands (what stage 2 may init from)


def code_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("pipelines", "training", "anystory"):
        (path / name).symlink_to(REPO / name)
    write_params(path / "params.yaml", toy_params("data/toyworld", "data/shards"))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def substitute(text: str, ws: Workspace) -> str:
    return text.replace("/mnt/shared", str(ws.root / "shared"))


def bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def option(tokens: list[str], name: str, default: str | None = None) -> str | None:
    return tokens[tokens.index(name) + 1] if name in tokens else default


def run_toyworld(cmd: Command, ws: Workspace) -> None:
    text = substitute(cmd.text, ws)
    bash(text, ws.root)
    out = ws.root / option(shlex.split(text), "--out", "data/toyworld")
    assert (out / "images" / "annotations.json").is_file() and list((out / "videos").glob("*.mp4")), out


def run_build(cmd: Command, ws: Workspace) -> None:
    text = substitute(cmd.text, ws)
    cwd = ws.root
    if text.startswith("ray job submit"):
        # The job's working dir is a copy of the checkout without data/: here a fresh one.
        text = text.split(" -- ", 1)[1]
        cwd = code_dir(ws.root / f"job{cmd.line}")
    bash(text + " --runner local", cwd)
    out = cwd / option(shlex.split(text), "--out", "data/shards")
    for kind, source in (("unpaired", "toyworld"), ("paired", "toyvideo")):
        stats = read_stats(out / kind)
        assert stats and {s["source"] for s in stats.values()} == {source}, (out, kind)
        assert sum(s["samples"] for s in stats.values()) > 0


def run_sed(cmd: Command, ws: Workspace) -> None:
    bash(cmd.text, ws.root)
    written = (ws.root / cmd.text.rsplit(">", 1)[1].strip()).read_text()
    assert "runs/tiny_stage" not in written and "runs/my_stage" in written


def shell_tokens(text: str) -> list[str]:
    return [re.sub(r"\$(\w+)", lambda m: SHELL_VARS[m.group(1)], t) for t in shlex.split(text)]


def fit_args(tokens: list[str]) -> list[str]:
    """The `python -m training fit` arguments of a launch line (torchrun, srun, Ray Train or plain)."""
    if "training.ray_train" in tokens:
        return ["fit", *tokens[tokens.index("--") + 1 :]]
    return tokens[tokens.index("training") + 1 :]


def parsed_config(args: list[str], cwd: Path) -> dict[str, Any]:
    """The configuration `python -m training` resolves from these arguments (the real LightningCLI
    parser, `--print_config`: it parses and exits before anything is built)."""
    from training.__main__ import main

    out = io.StringIO()
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
    finally:
        os.chdir(before)
    assert exit_info.value.code in (0, None), f"python -m training {' '.join(args)}: exit {exit_info.value.code}"
    return yaml.safe_load(out.getvalue())


def written_folders(config: dict[str, Any]) -> list[str]:
    trainer = config["trainer"]
    folders = [trainer["default_root_dir"]]
    folders += [lg["init_args"]["save_dir"] for lg in trainer.get("logger") or [] if "save_dir" in lg["init_args"]]
    folders += [cb["init_args"]["dirpath"] for cb in trainer.get("callbacks") or []
                if (cb.get("init_args") or {}).get("dirpath")]
    return folders


def tracked_folders() -> list[PurePosixPath]:
    """Folders `make repro` owns: DVC outputs and the folders of the git-tracked loss curves."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for entry in stage.get("outs", []):
            paths.append(PurePosixPath(next(iter(entry)) if isinstance(entry, dict) else entry))
        for entry in stage.get("plots", []):
            paths.append(PurePosixPath(next(iter(entry)) if isinstance(entry, dict) else entry).parent)
    return paths


def overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def parse_fit(cmd: Command, ws: Workspace) -> None:
    tokens = shell_tokens(cmd.text)
    args = fit_args(tokens)
    config = parsed_config(args, ws.root)
    init = config["model"]["init_args"]
    if init["preset"] == "sdxl":
        assert init["weights"] == {"base": SHELL_VARS["SDXL"], "image_encoder": SHELL_VARS["IMAGE_ENCODER"]}
        for arg in args:  # the launch line's trainer settings (Ray Train sets its own)
            if arg.startswith("--trainer."):
                key, value = arg[len("--trainer."):].split("=", 1)
                assert str(config["trainer"][key]) == value, arg
        return
    # A user's run of the toy configs writes nowhere `make repro` writes, and finds what it reads.
    for folder in written_folders(config):
        clash = [str(t) for t in tracked_folders() if overlaps(PurePosixPath(folder), t)]
        assert not clash, f"line {cmd.line}: writes {folder}, inside what make repro owns: {clash}"
    assert init["base_dir"] == option(
        [a for arg in args for a in arg.split("=", 1)], "--model.init_args.base_dir")
    if "--ckpt_path" in args:
        assert config["ckpt_path"] == option(args, "--ckpt_path")
    if init.get("init_from"):
        assert init["init_from"] in ws.exports, f"stage 2 starts from {init['init_from']}, no README export writes it"


def note_export(cmd: Command, ws: Workspace) -> None:
    ws.exports.add(option(shlex.split(cmd.text), "--out"))


def check_dvc_targets(cmd: Command, ws: Workspace) -> None:
    """`dvc repro TARGETS` makes every path the toy training configs and the README's train commands
    read: the targets are stages of dvc.yaml, and their upstream stages' outputs cover those paths."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {}
    for name, stage in stages.items():
        for entry in stage.get("outs", []):
            outs[PurePosixPath(next(iter(entry)) if isinstance(entry, dict) else entry)] = name
    targets = shlex.split(cmd.text)[2:]
    assert set(targets) <= set(stages), f"not stages of dvc.yaml: {set(targets) - set(stages)}"
    made, todo = set(), list(targets)
    while todo:  # the targets and everything upstream of them
        name = todo.pop()
        made.add(name)
        for dep in stages[name].get("deps", []):
            todo += [s for out, s in outs.items() if overlaps(out, PurePosixPath(dep)) and s not in made]
    produced = [out for out, s in outs.items() if s in made]
    config = yaml.safe_load((REPO / "training" / "configs" / "tiny_stage1.yaml").read_text())
    readme = README.read_text()
    needed = [*config["data"]["train_shards"], *config["data"]["val_shards"],
              *re.findall(r"--model\.init_args\.base_dir=(\S+)", readme)]
    for path in needed:
        assert any(out == PurePosixPath(path) or out in PurePosixPath(path).parents for out in produced), path


def make_dry(cmd: Command, ws: Workspace) -> None:
    target = shlex.split(cmd.text)[1]
    recipe = subprocess.run(["make", "-n", target], cwd=REPO, env=env(), capture_output=True, text=True).stdout
    assert {"test": "pytest tests", "repro": "dvc repro"}[target] in recipe, recipe


def parse_generate(cmd: Command, ws: Workspace) -> None:
    from anystory.cli import build_parser

    args = build_parser().parse_args(shell_tokens(cmd.text)[1:])
    assert args.command == "generate" and args.routing_maps == Path("maps.png")
    assert args.subject == [(Path("cat.png"), None), (Path("dog.jpg"), Path("dog_mask.png"))]


def help_runs(cmd: Command, ws: Workspace) -> None:
    bash(f"{cmd.text} --help", REPO)


def python_imports(cmd: Command, ws: Workspace) -> None:
    """The block compiles and what it imports exists (running it needs an image and a GPU)."""
    tree = ast.parse(cmd.text)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = __import__(node.module, fromlist=[a.name for a in node.names])
            assert all(hasattr(module, a.name) for a in node.names), ast.unparse(node)


@dataclass(frozen=True)
class Rule:
    pattern: str  # matched at the start of the command
    check: Callable[[Command, Workspace], None] | None  # run here, or parsed by the real parser
    tests: tuple[str, ...] = ()  # tests that run its equivalent (node ids)
    why: str = ""


RULES = [
    Rule(r"make (test|repro)$", make_dry, (),
         "`make -n` shows the recipe: `make test` is this suite; `make repro` (minutes) is run by the lead"),
    Rule(r"python -m pipelines\.toyworld ", run_toyworld),
    Rule(r"(python pipelines/build_shards\.py|ray job submit )", run_build,
         ("tests/pipelines/test_build_shards_ray.py::test_ray_job_submit_builds_the_shards",
          "tests/pipelines/test_build.py::test_every_input_is_accounted_for_and_corrupt_ones_are_rejected"),
         "run here without Ray; `ray job submit --working-dir` with absolute input paths runs in the Ray test"),
    Rule(r"dvc repro ", check_dvc_targets, ("tests/pipelines/test_dvc.py::test_dvc_repro_builds_resumes_and_pushes",)),
    Rule(r"sed ", run_sed),
    Rule(r"python -m training\.export ", note_export,
         ("tests/training/test_fit.py::test_two_stages_export_and_generate",
          "tests/training/test_export.py::test_toy_base_is_copied_and_the_export_matches")),
    Rule(r"(python -m training fit |torchrun |srun |RAY_ADDRESS=auto python -m training\.ray_train )", parse_fit,
         ("tests/training/test_fit.py::test_two_stages_export_and_generate",
          "tests/training/test_fit.py::test_killed_run_resumes_from_last_to_the_same_final_step",
          "tests/training/test_ddp.py::test_torchrun_two_processes",
          "tests/training/test_ray_train.py::test_ray_train_two_workers"),
         "training runs for minutes even tiny: parsed here; a fit, a resume, torchrun (CPU, 2 processes) and "
         "Ray Train run in their tests; srun is not run anywhere (no SLURM)"),
    Rule(r"anystory generate ", parse_generate, ("tests/anystory/test_cli.py::test_generate_writes_image_and_routing_maps",)),
    Rule(r"anystory inspect --preset sdxl$", None, ("tests/anystory/test_inspect.py::test_sdxl_counts_match_the_papers_table_1",),
         "13 s on 2 cores; the test checks the figures the README quotes"),
    Rule(r"from anystory\.export import load_export\n", python_imports,
         ("tests/anystory/test_pipeline.py::test_referencenet_runs_once_for_25_steps_with_cfg",
          "tests/anystory/test_export.py::test_export_load_gives_identical_outputs")),
    Rule(r"python -m training\.evaluate ", None,
         ("tests/training/test_evaluate.py::test_headline_and_details_with_intervals",)),
    Rule(r"python benchmarks/attention_overhead\.py ", None, ("tests/benchmarks/test_benchmarks_smoke.py::test_attention_overhead_quick",)),
    Rule(r"python benchmarks/generate\.py ", None, ("tests/benchmarks/test_benchmarks_smoke.py::test_generate_quick",)),
    Rule(r"python benchmarks/gpu_sdxl\.py", None, ("tests/benchmarks/test_benchmarks_smoke.py::test_gpu_sdxl_cpu_tiny",)),
    Rule(r"python benchmarks/loader\.py", None, ("tests/benchmarks/test_benchmarks_smoke.py::test_loader_quick",)),
    Rule(r"python benchmarks/build_shards\.py$", help_runs, (), "minutes on 2 CPUs and no smoke mode: --help only"),
]


def rule_of(cmd: Command) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, cmd.text)), None)


def test_every_readme_command_has_a_rule() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) > 10
    missing = [f"README.md:{c.line} [{c.lang}] {c.text[:100]}" for c in commands if rule_of(c) is None]
    assert not missing, "README commands that no test runs or maps:\n" + "\n".join(missing)
    unused = [r.pattern for r in RULES if not any(re.match(r.pattern, c.text) for c in commands)]
    assert not unused, f"rules for commands the README no longer has: {unused}"
    assert all(r.check or r.tests for r in RULES)


def test_a_new_command_without_a_rule_is_caught() -> None:
    text = README.read_text() + "\n```bash\npython -m training lint --all   # new\n```\n```\nls\n```\n"
    missing = [c for c in readme_commands(text) if rule_of(c) is None]
    assert [(c.lang, c.text) for c in missing] == [("bash", "python -m training lint --all"), ("(none)", "ls")]


def test_mapped_tests_exist() -> None:
    for rule in RULES:
        for node in rule.tests:
            path, name = node.split("::")
            tree = ast.parse((REPO / path).read_text())
            names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert name in names, f"{node}: no such test (rule {rule.pattern!r})"


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv, not the CLI's
def test_readme_commands(tmp_path: Path) -> None:
    """The checks run in README order: the toy world before the build, the export before stage 2."""
    ws = Workspace(code_dir(tmp_path / "checkout"), set())
    ran = []
    for cmd in readme_commands(README.read_text()):
        rule = rule_of(cmd)
        assert rule is not None, cmd
        if rule.check is not None:
            rule.check(cmd, ws)
            ran.append(cmd.line)
    assert ran


def test_links_stay_in_the_repository() -> None:
    """Links and quoted paths of the README and docs/ name files of the repository (a clone has
    nothing beside it)."""
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert not re.findall(r"`\.\./[^`]*`", text), f"{doc.name}: a path outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{doc.name}: link {target}"


def test_readme_figures_come_from_metrics() -> None:
    """The toy chain's figures the README quotes are those of the committed evaluation."""
    metrics = json.loads((REPO / "metrics" / "eval.json").read_text())
    details = json.loads((REPO / "metrics" / "eval_details.json").read_text())
    text = README.read_text()
    miou, random_miou = (float(x) for x in re.search(r"router mIoU (\d\.\d+) \[[^\]]*\], against (\d\.\d+) for random", text).groups())
    gain = float(re.search(r"validation loss (\d+\.\d)% lower", text).group(1))
    got = (metrics["router_miou"], details["router_miou"]["uniform_random"]["all_t"]["value"],
           metrics["condition_gain"])
    assert (round(got[0], 2), round(got[1], 2), round(100 * got[2], 1)) == (miou, random_miou, gain)
