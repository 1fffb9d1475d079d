"""The docs stand on their own: their shell commands run, and no file points off the repository.

``test_doc_command``: every line of every fenced ``bash`` block of README.md and docs/*.md
is one command (``\\`` continues a line; ``# ...`` is a comment). A renamed option, a
renamed command or a changed default that breaks a documented command fails here,
not for the user. The rules (also in docs/contributing.md):

* ``simgen`` and ``simgen-train`` (also as ``.venv/bin/...``) run in-process through
  ``typer.testing.CliRunner`` on the Typer app that pyproject.toml's ``[project.scripts]``
  names, in a scratch folder per ``bash`` block (a block's commands build on each other;
  ``data/``, ``runs/`` ... land there), with ``$SIMGEN_CACHE`` pointing at a scratch
  cache. Every option is first checked against the command's parameters, so an unknown
  option is named in the failure.
* To keep the suite fast, arguments are **appended** to some commands (the last value of an
  option wins, so the documented options are still parsed): ``generate``/``sweep`` make 2–4
  images of 64² with the incoherent model in this process (``--cluster none``); training
  runs one epoch of a tiny U-Net on 32² crops (``SHRINK`` below).
* An input that the docs assume to exist and that no earlier command of the block made
  (``data/default.zarr`` from ``make dataset``, ``my_images/``, ``runs/...``,
  ``relaxed_cell.cif``) is copied in from a tiny fixture of its kind (``_fixture``).
* ``label`` with that 1-epoch U-Net may exit 1 because the network finds no lattice; that
  one failure is accepted (``_accepted_failure``), any other fails the test.
* ``python -c ...`` runs with this interpreter in the same scratch folder.
* Not run, with the reason shown by ``pytest -rs``: ``make`` targets (they build the
  environment, the full dataset or the whole suite), ``pip`` installs, synopsis lines
  (``UPPERCASE`` placeholders, ``[optional]`` brackets, ``...``) and commands reading
  microscope formats the test cannot fabricate (``.dm3 .dm4 .emd .ser``, globs). Those of
  ``simgen``/``simgen-train`` still have every option checked.
* A line whose comment says ``docs-test: skip <reason>`` is not run (its options are
  still checked); use it for commands too expensive for the default suite.
* A command of any other program fails the test until a rule above covers it.

``test_enough_doc_commands_run`` keeps the rules honest: most commands must run.

``test_no_machine_paths_in_tracked_files``: no tracked text file names a path of a
development machine or the shared folder beside the repository.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import import_module
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Appended to a command (program, subcommand) so that it runs in a second or two.
_TINY_TRAIN = ["--set", "model={depth: 1, width: 4}", "--set", "num_threads=1"]
SHRINK = {
    ("simgen", "generate"): [
        *("--n", "4", "--size", "64", "--model", "incoherent", "--device", "cpu"),
        *("--cluster", "none"),
    ],
    ("simgen", "sweep"): [
        *("--n", "2", "--size", "64", "--cluster", "none"),
        *("--set", "simulation.model=incoherent", "--set", "simulation.device=cpu"),
    ],
    ("simgen-train", "train"): [
        *("-q", "--set", "epochs=1", "--set", "data.crop=32", "--set", "data.batch_size=4"),
        *_TINY_TRAIN,
    ],
    ("simgen-train", "noise-study"): [
        *("-q", "--device", "cpu", "--set", "train.epochs=1", "--set", "train.data.crop=32"),
        *("--set", "train.model={depth: 1, width: 4}", "--set", "train.num_threads=1"),
        *("--set", "evaluate.tile=64", "--set", "evaluate.overlap=16"),
    ],
    ("simgen", "match"): ["--samples", "1", "--set", "dataset.image_size=[128,128]"],
    ("simgen-train", "evaluate"): ["-q", "--device", "cpu", "--tile", "64"],
    ("simgen-train", "predict"): ["-q", "--device", "cpu", "--tile", "64"],
    ("simgen-train", "label"): ["-q", "--device", "cpu", "--tile", "64", "--overlap", "16"],
}
#: Replaces a documented value (after the documented option) where appending is not enough.
REPLACE = {("simgen-train", "train", "--members"): "2"}
#: Options whose value is written, never read (never replaced by a fixture).
OUTPUT_OPTIONS = {"-o", "--output", "--out", "--write-config"}
MICROSCOPE_SUFFIXES = {".dm3", ".dm4", ".emd", ".ser"}
IMAGE_SUFFIXES = {".tif", ".tiff"}
CELL_SUFFIXES = {".cif", ".xyz", ".traj", ".vasp", ".pdb"}
#: Below this many commands run, the rules skip too much (31 of 43 run now).
MIN_RUN = 25

#: Fences whose lines are commands (README and docs use ``bash``).
SHELL_FENCES = {"```bash", "```sh", "```shell"}
SKIP_MARKER = re.compile(r"docs-test:\s*skip\b[\s:(—-]*(?P<reason>[^)]*)\)?")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class DocCommand:
    path: Path
    block: int
    line: int
    text: str
    argv: tuple[str, ...]
    #: "run", "check" (options checked, not run), "skip" or "error" (no rule applies)
    action: str
    reason: str = ""

    @property
    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.line}"

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""


def _split_comment(line: str) -> tuple[str, str]:
    """``(command, comment)``: the first ``#`` outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def bash_lines(path: Path):
    """``(block, line number, command, comment)`` of each command in a file's ``bash`` blocks.

    ``block`` is the line number of the block's opening fence.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    in_block, block = False, 0
    pending, start, comments = "", 0, []
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            if in_block and pending:
                raise AssertionError(f"{path.name}:{start}: block ends inside a continued line")
            in_block = stripped in SHELL_FENCES if not in_block else False
            block = number
            continue
        if not in_block:
            continue
        command, comment = _split_comment(raw)
        if not pending and not command.strip():
            continue  # blank or comment-only line
        if not pending:
            start = number
        comments.append(comment)
        if command.endswith("\\"):
            pending += command[:-1].strip() + " "
            continue
        yield block, start, (pending + command.strip()).strip(), " ".join(c for c in comments if c)
        pending, comments = "", []


def _is_synopsis(argv) -> bool:
    return any(
        "[" in t or "]" in t or "..." in t or (len(t) > 1 and PLACEHOLDER.match(t)) for t in argv
    )


def classify(path: Path, block: int, line: int, text: str, comment: str) -> DocCommand:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as err:  # unbalanced quotes
        return DocCommand(path, block, line, text, (), "error", f"{path.name}:{line}: {err}")
    cmd = DocCommand(path, block, line, text, argv, "run")
    marker = SKIP_MARKER.search(comment)
    program = cmd.program
    ours = program in entry_points()
    if marker:
        reason = marker.group("reason").strip()
        assert reason, f"{cmd.where}: `docs-test: skip` needs a reason"
        return dataclasses.replace(cmd, action="check" if ours else "skip", reason=reason)
    if program == "make":
        return dataclasses.replace(
            cmd, action="skip", reason="make target: builds the environment or runs it all"
        )
    if program in {"pip", "pip3"} or argv[1:3] == ("-m", "pip"):
        return dataclasses.replace(cmd, action="skip", reason="installs packages")
    if program in {"python", "python3"} and argv[1:2] == ("-c",):
        return cmd
    if not ours:
        reason = (
            f"{cmd.where}: no rule for `{program}` (tests/test_docs.py: add one, or mark the "
            "line `# docs-test: skip <reason>`)"
        )
        return dataclasses.replace(cmd, action="error", reason=reason)
    if _is_synopsis(argv):
        return dataclasses.replace(cmd, action="check", reason="synopsis with placeholders")
    for token in argv[1:]:
        if Path(token).suffix.lower() in MICROSCOPE_SUFFIXES or "*" in token:
            return dataclasses.replace(
                cmd, action="check", reason=f"reads {token}: a microscope file the test lacks"
            )
    return cmd


@cache
def entry_points() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: program name -> ``module:attribute``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


@cache
def app_for(program: str) -> typer.Typer:
    module, _, attr = entry_points()[program].partition(":")
    return getattr(import_module(module), attr)


def doc_commands() -> list[DocCommand]:
    out = []
    for path in DOC_FILES:
        for item in bash_lines(path):
            out.append(classify(path, *item))
    return out


COMMANDS = doc_commands()


# -- option checking ---------------------------------------------------------------------------


def resolve(argv):
    """The (click) command ``argv`` calls, the subcommand names and the remaining arguments.

    Duck-typed: recent Typer versions ship their own copy of click's classes.
    """
    command = typer.main.get_command(app_for(Path(argv[0]).name))
    names, rest = [], list(argv[1:])
    while getattr(command, "commands", None) is not None and rest and rest[0][:1] != "-":
        sub = command.commands.get(rest[0])
        label = " ".join([Path(argv[0]).name, *names])
        assert sub is not None, f"`{label}` has no command {rest[0]!r} (in: {shlex.join(argv)})"
        command = sub
        names.append(rest.pop(0))
    return command, names, rest


def check_options(cmd: DocCommand):
    command, names, rest = resolve(cmd.argv)
    params = {
        opt: p
        for p in command.params
        if getattr(p, "param_type_name", "") == "option"
        for opt in (*p.opts, *p.secondary_opts)
    }
    label = " ".join([cmd.program, *names])
    tokens = [t.strip("[]") for t in rest]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token == "-" or re.match(r"^-\d", token):
            continue
        name = token.split("=", 1)[0]
        assert name in params, f"{cmd.where}: `{label}` has no option {name} (in: {cmd.text})"
        if "=" not in token and not params[name].is_flag and not params[name].count:
            i += 1  # its value


# -- fixtures for inputs the docs take for granted ---------------------------------------------

runner = CliRunner()


def _invoke(program: str, args: list[str]):
    result = runner.invoke(app_for(program), args)
    assert result.exit_code == 0, f"{program} {shlex.join(args)}\n{result.output}"
    return result


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """Scratch cache and folders; fixtures are built when a command first needs one."""
    base = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMGEN_CACHE", str(base / "cache"))
        mp.setenv("MPLBACKEND", "Agg")
        yield {"base": base, "made": {}}


def _fixture_kind(token: str) -> str | None:
    suffix = Path(token.rstrip("/")).suffix.lower()
    if suffix == ".zarr":
        return "store"
    if token.startswith("runs/"):
        return "run"
    if token.endswith("/"):
        return "image_dir"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in CELL_SUFFIXES:
        return "cell"
    return None


def _fixture(env, kind: str) -> Path:
    """The tiny stand-in of one kind: a real 4-sample store, a 1-epoch U-Net on it, an
    ImageJ TIFF (pixel size in its metadata) of one of its images, a folder with one WSe2
    TIFF at 0.1 Å/px (for ``simgen match``), a MoS2 cell file."""
    base, made = env["base"] / "fixtures", env["made"]
    if kind in made:
        return made[kind]
    base.mkdir(exist_ok=True)
    if kind == "store":
        store = base / "store.zarr"
        _invoke("simgen", ["generate", "-o", str(store), *SHRINK[("simgen", "generate")]])
        made[kind] = store
    elif kind == "run":
        run = base / "run"
        train = ["train", "-s", str(_fixture(env, "store")), "-o", str(run)]
        _invoke("simgen-train", train + SHRINK[("simgen-train", "train")])
        made[kind] = run
    elif kind in {"image", "image_dir"}:
        import tifffile
        import zarr

        root = zarr.open_group(str(_fixture(env, "store")), mode="r")
        res = 10.0 / float(root.attrs["pixel_size_A"])  # px per nm
        folder = base / "images"
        folder.mkdir()
        image = folder / "scan_001.tif"
        meta = {"unit": "nm"}
        tifffile.imwrite(
            image, root["images"][0], imagej=True, resolution=(res, res), metadata=meta
        )
        made["image"], made["image_dir"] = image, folder
    elif kind == "lattice_dir":  # one WSe2 image at 0.1 Å/px: enough columns to measure
        import tifffile
        import zarr

        store = base / "wse2.zarr"
        _invoke(
            "simgen",
            [
                *("generate", "-o", str(store), "--n", "1", "--size", "160"),
                *("--model", "incoherent", "--device", "cpu", "--cluster", "none"),
                *("--set", "structure.material=WSe2", "--set", "structure.dopant=V"),
                *("--set", "optics.pixel_size_A=0.1"),
            ],
        )
        folder = base / "wse2_images"
        folder.mkdir()
        image = zarr.open_group(str(store), mode="r")["images"][0]
        tifffile.imwrite(
            folder / "scan_001.tif",
            image,
            imagej=True,
            resolution=(100, 100),
            metadata={"unit": "nm"},
        )
        made[kind] = folder
    elif kind == "cell":
        import ase.io
        from ase.build import mx2

        made[kind] = base / "cell.cif"
        ase.io.write(made[kind], mx2("MoS2", a=3.16, thickness=3.17, vacuum=5.0))
    return made[kind]


def prepare(cmd: DocCommand, env, cwd: Path) -> list[str]:
    """argv to run in ``cwd``: missing inputs copied in from fixtures, SHRINK appended."""
    _, names, _ = resolve(cmd.argv)
    sub = names[0] if names else ""
    args = list(cmd.argv[1:])
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        replace = REPLACE.get((cmd.program, sub, token))
        if replace is not None and i < len(args):
            args[i] = replace
            i += 1
        elif token in OUTPUT_OPTIONS or token == "--set":
            i += 1  # its value is written, or is not a path
        elif not token.startswith("-") and token not in names and not (cwd / token).exists():
            kind = _fixture_kind(token)
            if kind == "image_dir" and (cmd.program, sub) == ("simgen", "match"):
                kind = "lattice_dir"  # match needs a lattice it can measure
            if kind is not None:
                source, target = _fixture(env, kind), cwd / token.rstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target)
                else:
                    shutil.copy(source, target)
    return args + SHRINK.get((cmd.program, sub), [])


def _accepted_failure(cmd: DocCommand, output: str) -> bool:
    """``label`` with the 1-epoch fixture U-Net: exit 1 is fine when every file got through
    reading, resampling and segmentation and failed only in the lattice fit (an untrained
    network finds no lattice). Any other failure counts."""
    if cmd.program != "simgen-train" or cmd.argv[1:2] != ("label",):
        return False
    failed = [line for line in output.splitlines() if line.startswith("failed: ")]
    return bool(failed) and all("no 2H lattice the model recognises" in f for f in failed)


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.program}" for c in COMMANDS])
def test_doc_command(cmd: DocCommand, docs_env):
    assert cmd.action != "error", cmd.reason
    ours = cmd.program in entry_points()
    if ours:
        check_options(cmd)
    if cmd.action != "run":
        suffix = " (options checked)" if cmd.action == "check" else ""
        pytest.skip(f"{cmd.where}: {cmd.reason}{suffix}")
    # one folder per block: a block's commands build on each other, blocks stand alone
    cwd = docs_env["base"] / "work" / f"{cmd.path.stem}-{cmd.block}"
    cwd.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        if ours:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small tensors; a second thread only contends
            try:
                args = prepare(cmd, docs_env, cwd)
                result = runner.invoke(app_for(cmd.program), args)
            finally:
                torch.set_num_threads(threads)
            ok = result.exit_code == 0 or (
                result.exit_code == 1 and _accepted_failure(cmd, result.output)
            )
            assert ok, (
                f"{cmd.where}: `{cmd.text}` exited {result.exit_code}\n"
                f"ran: {cmd.program} {shlex.join(args)}\n{result.output[-3000:]}"
                + (f"\n{result.exception!r}" if result.exception else "")
            )
        else:  # python -c
            proc = subprocess.run(
                [sys.executable, *cmd.argv[1:]], cwd=cwd, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"{cmd.where}: `{cmd.text}`\n{proc.stderr[-3000:]}"


def test_enough_doc_commands_run():
    counts = {a: sum(c.action == a for c in COMMANDS) for a in ("run", "check", "skip")}
    print(
        f"doc commands: {counts['run']} run, {counts['check']} options checked, "
        f"{counts['skip']} skipped"
    )
    assert counts["run"] >= MIN_RUN, counts
    assert counts["run"] > 2 * (counts["check"] + counts["skip"]), counts
    assert all(c.reason for c in COMMANDS if c.action != "run")


def test_parser_joins_continuations_and_reads_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\n"
        "simgen inspect a.zarr   # what is in it\n"
        "simgen sweep --bins 0,5-20 \\\n  -o d   # docs-test: skip (needs a GPU)\n"
        "# a comment line\n"
        "simgen preview 'a #b.zarr' -o p.png\n"
        "```\n"
        "```\nnot bash\n```\n"
    )
    lines = list(bash_lines(doc))
    assert [(block, n) for block, n, _, _ in lines] == [(1, 2), (1, 3), (1, 6)]
    assert lines[1][2] == "simgen sweep --bins 0,5-20 -o d"
    cmds = [classify(doc, *item) for item in lines]
    assert [c.action for c in cmds] == ["run", "check", "run"]
    assert cmds[1].reason == "needs a GPU"
    assert cmds[2].argv[2] == "a #b.zarr"
    unknown = classify(doc, 1, 1, "rm -rf data", "")
    assert unknown.action == "error" and "no rule for `rm`" in unknown.reason
    assert classify(doc, 1, 1, "make dataset", "").action == "skip"
    synopsis = classify(doc, 1, 1, "simgen inspect STORE [--json]", "")
    assert synopsis.action == "check"


def test_option_check_names_the_unknown_option():
    doc = ROOT / "x.md"
    cmd = classify(doc, 1, 1, "simgen generate --n 2 --nosuch 3 -o a.zarr", "")
    with pytest.raises(AssertionError, match="`simgen generate` has no option --nosuch"):
        check_options(cmd)
    check_options(classify(doc, 1, 1, "simgen generate --n 2 --set a=--b -o a.zarr", ""))
    with pytest.raises(AssertionError, match="`simgen` has no command 'generat'"):
        check_options(classify(doc, 1, 1, "simgen generat -o a.zarr", ""))


# -- no paths of a development machine --------------------------------------------------------

#: Absolute paths of development machines and the shared folder beside the checkout. Built
#: from pieces so that this file does not match itself.
MACHINE_PATH = re.compile(
    r"(?<![\w.~])(?:/(?:work|root|scratch|mnt|srv)/"  # absolute roots of build/dev hosts
    r"|/home/[A-Za-z_][\w.-]*"  # someone's home
    r"|/Users/[A-Za-z_][\w.-]*"  # macOS home
    r"|[A-Za-z]:\\Users\\"  # Windows home
    r"|\.\./shared\b"  # the reference folder beside the repository
    r")"
)
#: (folder prefix, pattern) pairs that may name a machine path, each with why.
ALLOWED = [
    # Benchmarks and tests may look for real microscope images in ../shared/real/ on a
    # development machine and skip when it is absent; nothing else (docs included) may.
    ("benchmarks/", re.compile(r"\.\./shared/real/")),
    ("tests/", re.compile(r"\.\./shared/real/")),
]
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".zarr", ".pt", ".npy", ".tif"}


def _tracked_text_files():
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or Path(name).suffix.lower() in BINARY_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        yield name, data.decode("utf-8", errors="replace")


def machine_paths(name: str, text: str) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        for m in MACHINE_PATH.finditer(line):
            rest = line[m.start() :]
            if any(name.startswith(folder) and p.match(rest) for folder, p in ALLOWED):
                continue
            hits.append(f"{name}:{number}: {line.strip()[:120]}")
    return hits


def test_no_machine_paths_in_tracked_files():
    hits = [h for name, text in _tracked_text_files() for h in machine_paths(name, text)]
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "name, line, bad",
    [
        ("docs/x.md", "see `" + "/wo" + "rk/shared/REFERENCE.md`", True),
        ("README.md", "data in " + "/ho" + "me/alice/stem", True),
        ("docs/x.md", "cite " + "../sha" + "red/seeds/001.txt", True),
        ("docs/x.md", "real images in " + "../sha" + "red/real/", True),  # not in docs
        ("benchmarks/b.py", 'REAL = ROOT / "' + "../sha" + 'red/real/"', False),
        ("tests/t.py", "skip unless " + "../sha" + "red/real/ exists", False),
        ("tests/t.py", "open " + "../sha" + "red/seeds/x", True),
        ("docs/x.md", "simgen generate -o /tmp/run/a.zarr; cache in ~/.cache/simgen", False),
        ("docs/x.md", "python -m pip install ./wheels/x.whl", False),
    ],
)
def test_machine_path_rule(name, line, bad):
    assert bool(machine_paths(name, line)) is bad
